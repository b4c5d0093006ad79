"""Reading a run directory back: ``load_run(run_dir, step=None) -> LoadedRun``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.data.tokenizer import Tokenizer
from moelab.errors import MoelabError
from moelab.models.transformer import MoETransformer
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.train.trainer import CKPT_DIR, CONFIG_FILE, SUMMARY_FILE, TOKENIZER_FILE


@dataclass
class LoadedRun:
    """A trained model (eval mode, CPU unless ``device`` was given) with its config and tokenizer."""

    model: MoETransformer  # or moelab.models.hf.HFMoEModel for an imported Hugging Face run
    config: RunConfig
    tokenizer: Tokenizer
    step: int
    run_dir: Path

    def summary(self) -> dict[str, Any]:
        p = self.run_dir / SUMMARY_FILE
        return read_json_file(p) if p.is_file() else {}


def read_json_file(path: Path) -> Any:
    """``json.loads`` of a run file, with a MoelabError naming the file when it is truncated or corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MoelabError(f"{str(path)!r} is corrupted or truncated: not valid JSON ({e})") from None


def read_config_dict(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        raise MoelabError(f"run_dir={str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    return read_json_file(p)


def load_config(run_dir: str | Path) -> RunConfig:
    """The run's RunConfig (an imported Hugging Face run's extra ``hf`` section is left out)."""
    d = read_config_dict(run_dir)
    try:
        return RunConfig.from_dict({k: v for k, v in d.items() if k != "hf"})
    except MoelabError as e:
        raise MoelabError(f"{str(Path(run_dir) / CONFIG_FILE)!r} is not a valid run config: {e}") from None


def load_run(run_dir: str | Path, step: int | None = None, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the checkpoint ``step`` (None: the newest) of ``run_dir``; the weights' sha256 is verified."""
    run_dir = Path(run_dir)
    if "hf" in read_config_dict(run_dir):  # an imported Hugging Face model (moelab.models.hf)
        from moelab.models.hf.run import load_hf_run

        return load_hf_run(run_dir, step, device=device)
    config = load_config(run_dir)
    tok_path = run_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise MoelabError(f"run_dir={str(run_dir)!r} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.load(tok_path)
    path = ckpt.find_checkpoint(run_dir / CKPT_DIR, step)
    model_sd, _, state = ckpt.read_checkpoint(path, with_optimizer=False)
    model = MoETransformer(config.model)
    ckpt.load_model_state(model, model_sd, path)
    model.to(device).eval()
    return LoadedRun(model=model, config=config, tokenizer=tokenizer, step=int(state["step"]), run_dir=run_dir)

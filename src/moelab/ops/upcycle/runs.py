"""Upcycling run directories: ``upcycle_run(source, method, options, out)`` loads a run, applies a
recipe, and writes ``out`` as an ordinary run directory at step 0 (config.json with the new MoE blocks
and ``layer_overrides``, the source's tokenizer and data manifest, ``checkpoints/step_000000``, and
``upcycle.json`` recording the method, its options and the source). Continue it with
``moelab train --init-from OUT`` (fresh optimizer) or load it with ``load_run``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from moelab.errors import MoelabError
from moelab.models.transformer import MoETransformer
from moelab.ops.upcycle.common import persist_model_config
from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS
from moelab.train import checkpoint as ckpt
from moelab.train.run import load_run
from moelab.train.trainer import CKPT_DIR, CONFIG_FILE, MANIFEST_FILE, TOKENIZER_FILE

UPCYCLE_FILE = "upcycle.json"


def make_options(method: str, **kw: Any):
    """The typed options of ``method`` from keyword values (None values are left at their defaults)."""
    cls = UPCYCLE_CONFIGS[UPCYCLERS.entry(method).name]
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(k for k, v in kw.items() if v is not None and k not in names)
    if bad:
        raise MoelabError(f"method={method!r} has no options {bad}; valid: {sorted(names)}")
    return cls(**{k: v for k, v in kw.items() if v is not None})


def calibration_batches(run, n: int, batch_size: int = 8):
    """``n`` training batches ``(input_ids_BL, labels_BL)`` of the run's own data (for utility scores)."""
    from moelab.data.loader import TrainStream
    from moelab.data.pipeline import prepare_data

    data = prepare_data(run.config.data)
    stream = TrainStream(data.tokens["train"], data.tokenizer, run.config.data.seq_len, batch_size,
                         run.config.data.seed, domains=data.splits.domains)
    return [(b.input_ids_BL, b.labels_BL) for b in (stream.next_batch() for _ in range(n))]


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MoelabError(f"out={str(out)!r} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_model_run(model: torch.nn.Module, config, source: Path, out: Path, record: dict[str, Any]) -> Path:
    """Write ``model`` with RunConfig ``config`` as run directory ``out`` at step 0 (checked loadable)."""
    rebuilt = MoETransformer(config.model)
    rebuilt.load_state_dict(model.state_dict())  # the config describes the weights exactly
    config.save(out / CONFIG_FILE)
    for name in (TOKENIZER_FILE, MANIFEST_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    ckpt.save_checkpoint(out / CKPT_DIR, 0, model, None, {"upcycle": record})
    (out / UPCYCLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def upcycle_run(source: str | Path, method: str, options, out: str | Path, *, overwrite: bool = False,
                calib_batches: int = 8) -> Path:
    """Apply upcycling ``method`` (with ``options``) to run ``source``; write run directory ``out``."""
    source, out = Path(source), Path(out)
    fn = UPCYCLERS.get(method)
    run = load_run(source)
    model = run.model.float()
    kw: dict[str, Any] = {"template": run.config.model.moe}
    if method == "grow" and getattr(options, "utility", False):
        from moelab.ops.upcycle.grow import expert_utility

        kw["utility"] = expert_utility(model, calibration_batches(run, calib_batches))
    if method == "carve":
        kw["calibration"] = [ids for ids, _ in calibration_batches(run, calib_batches)]
    prepare_out(out, overwrite)
    fn(model, options, **kw)
    config = run.config
    config.model = persist_model_config(config.model, model)
    record = {"method": method, "options": dataclasses.asdict(options), "source": str(source),
              "source_step": run.step, "params": model.num_parameters() if hasattr(model, "num_parameters") else None}
    return save_model_run(model, config, source, out, record)

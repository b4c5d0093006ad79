"""Live training logs beyond ``metrics.jsonl``: TensorBoard and Weights & Biases.

``train.log`` is a comma-separated list of backends (``"jsonl,tensorboard,wandb"``); ``jsonl`` is
always on (``metrics.jsonl``/``eval.jsonl`` are the run's record, written by the trainer itself).
The trainer calls :meth:`Loggers.log_step` with every metrics.jsonl record and
:meth:`Loggers.log_eval` with every eval.jsonl record; each backend writes the same numbers:

- ``train/loss``, ``train/lm_loss``, ``train/aux_loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``
- per MoE layer ``L``: ``routing/layerL/{load_max_over_mean, load_cv, router_entropy, dropped_frac,
  experts_per_token}``
- ``val/loss``, ``val/ppl`` and ``val/ppl/<domain>`` at each evaluation
- every ``train.log_heatmap_every`` steps an image ``routing/load_heatmap`` (rows: MoE layers,
  columns: experts, colour: share of the layer's routed tokens).

TensorBoard goes through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package) into
``RUN/tensorboard/``; W&B runs in offline mode unless ``WANDB_MODE`` is set by the user, into
``RUN/wandb/`` (``wandb sync`` uploads it later). A backend whose package is absent is a
MoelabError naming the package and how to install it, raised before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError, check_choice

BACKENDS = ("jsonl", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
LAYER_KEYS = ("load_max_over_mean", "load_cv", "router_entropy", "dropped_frac", "experts_per_token")
STEP_KEYS = ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s")


def parse_log_spec(spec: str) -> list[str]:
    """``"jsonl,tensorboard"`` -> ``["jsonl", "tensorboard"]`` (jsonl always first; names checked)."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    for name in names:
        check_choice("train.log", name, BACKENDS)
    return ["jsonl"] + [n for n in dict.fromkeys(names) if n != "jsonl"]


def check_backends(spec: str) -> list[str]:
    """The backends of ``spec``; MoelabError when one's package is not installed."""
    names = parse_log_spec(spec)
    for name in names[1:]:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise MoelabError(f"train.log={spec!r} needs the {_PACKAGES[name]!r} package, which is not installed; "
                              f"install it (pip install {_PACKAGES[name]}) or drop {name!r} from train.log")
    return names


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, named as the backends log them."""
    out = {f"train/{k}": float(record[k]) for k in STEP_KEYS if isinstance(record.get(k), (int, float))}
    for layer in record.get("layers", []):
        for k in LAYER_KEYS:
            if isinstance(layer.get(k), (int, float)):
                out[f"routing/layer{layer['layer']}/{k}"] = float(layer[k])
    return out


def eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    out = {f"val/{k[4:]}": float(result[k]) for k in ("val_loss", "val_ppl")
           if isinstance(result.get(k), (int, float))}
    for dom, r in (result.get("per_domain") or {}).items():
        if isinstance(r.get("ppl"), (int, float)):
            out[f"val/ppl/{dom}"] = float(r["ppl"])
    return out


def load_heatmap_LE(record: dict[str, Any]):
    """Rows: MoE layers, columns: experts, values: share of that layer's routed tokens (numpy, or None)."""
    import numpy as np

    rows = [layer.get("counts") for layer in record.get("layers", []) if layer.get("counts")]
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    counts_LE = np.asarray(rows, dtype=np.float64)
    return counts_LE / np.maximum(counts_LE.sum(axis=1, keepdims=True), 1.0)


def heatmap_image_HWC(share_LE):
    """An RGB uint8 image (H, W, 3) of the load shares, one cell per (layer, expert), 16 px per cell."""
    import numpy as np
    from matplotlib import colormaps

    scaled = share_LE / max(float(share_LE.max()), 1e-12)
    rgb = (colormaps["viridis"](scaled)[..., :3] * 255).astype(np.uint8)
    return np.kron(rgb, np.ones((16, 16, 1), dtype=np.uint8))


class TensorBoardLogger:
    """``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{_flat_config(config)}\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, step)

    def image(self, name: str, img_HWC, step: int) -> None:
        self.writer.add_image(name, img_HWC, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """``wandb.init`` in offline mode (unless ``WANDB_MODE`` is set) with the run's config, into ``RUN/wandb``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="moelab", name=run_dir.name, dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, img_HWC, step: int) -> None:
        self.run.log({name: self.wandb.Image(img_HWC)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _flat_config(config: dict[str, Any], prefix: str = "") -> str:
    lines = []
    for k, v in config.items():
        if isinstance(v, dict) and v:
            lines.append(_flat_config(v, f"{prefix}{k}."))
        else:
            lines.append(f"{prefix}{k} = {v!r}")
    return "\n".join(lines)


class Loggers:
    """The live backends chosen by ``train.log`` (jsonl is the trainer's own and always on)."""

    def __init__(self, spec: str, run_dir: str | Path, config: dict[str, Any], heatmap_every: int = 100) -> None:
        names = check_backends(spec)
        kinds = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
        self.backends = [kinds[n](Path(run_dir), config) for n in names[1:]]
        self.heatmap_every = heatmap_every

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.backends:
            return
        step, values = int(record["step"]), step_scalars(record)
        share_LE = load_heatmap_LE(record) if self.heatmap_every and step % self.heatmap_every == 0 else None
        for b in self.backends:
            b.scalars(values, step)
            if share_LE is not None:
                b.image("routing/load_heatmap", heatmap_image_HWC(share_LE), step)

    def log_eval(self, result: dict[str, Any]) -> None:
        for b in self.backends:
            b.scalars(eval_scalars(result), int(result["step"]))

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []

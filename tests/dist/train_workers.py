"""Training runs on each rank (loaded by ``moelab.dist.launch.spawn``); the parent compares them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_micro import micro_config  # noqa: E402

from moelab.dist.groups import init_parallel  # noqa: E402
from moelab.dist.trainer import train_distributed  # noqa: E402
from moelab.train.config import RunConfig  # noqa: E402


def dist_config(tmp: Path, ep: int, **train_kw):
    kw = dict(steps=10, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, eval_max_batches=1)
    kw.update(train_kw)
    cfg = micro_config(tmp, **kw)
    moe = cfg.model.moe
    moe.num_shared_experts, moe.z_loss_coef, moe.aux_free_bias, moe.aux_loss_coef = 1, 1e-3, True, 0.05
    moe.bias_update_rate = 1e-2
    cfg.parallel.ep = ep
    return cfg


def train_runs(rank: int, world: int, tmp: str, runs: list[dict]) -> None:
    """``runs``: {"name", "config": RunConfig.to_dict()} (built by the parent: the corpus is written once)."""
    for spec in runs:
        cfg = RunConfig.from_dict(spec["config"])
        state = init_parallel(cfg.parallel.ep, num_experts=cfg.model.moe.num_experts)
        train_distributed(cfg, Path(tmp) / spec["name"], progress="off", state=state)


def read_losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP): save on N ranks, load on M.

Layout: ``RUN/dist_checkpoints/step_XXXXXX/`` holds DCP's files (``.metadata``, ``*.distcp``) and
``dist.json`` (step, world, ep, data-stream position, tokens seen, rank 0's RNG state). Written apart
from the single-process ``RUN/checkpoints`` (safetensors), which the single-process trainer owns.

Saved state: ``{"model": ..., "optim": {param name: {"step", "exp_avg", "exp_avg_sq"}}}``. EP-sharded
expert weights (and their Adam moments) are saved as DTensors ``Shard(0)`` on the (edp, ep) mesh, so
their global shape ``[E, ...]`` is in the metadata; everything else is a replicated plain tensor
(DCP writes it once). Loading reads whatever slice the loading rank owns, whatever the saving world
size was: DCP reshards. A single process loads into full plain tensors without a process group.

At the end of a distributed run rank 0 also writes the final step unsharded as a single-process
checkpoint (:func:`export_single_process`), for ``load_run`` and the analysis tools.

Not reshardable (refused with :class:`MoelabError`): resuming a single-process checkpoint
(``RUN/checkpoints``, safetensors) on several ranks, and a DCP checkpoint whose expert count differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moelab.dist.ep import expert_param_names
from moelab.dist.groups import ParallelState, guarded
from moelab.errors import MoelabError

DIST_DIR, META = "dist_checkpoints", "dist.json"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / DIST_DIR / f"step_{step:06d}"


def list_dist_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / DIST_DIR
    if not root.is_dir():
        return []
    out = [(int(p.name[5:]), p) for p in root.glob("step_*") if (p / META).is_file()]
    return sorted(out)


def _shard(t: torch.Tensor, state: ParallelState) -> Any:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(t, state.mesh, [Replicate(), Shard(0)], run_check=False)


def _wrap(name: str, t: torch.Tensor, experts: set[str], state: ParallelState) -> Any:
    return _shard(t, state) if name in experts and state.mesh is not None and state.ep > 1 else t


def _ensure_adam_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        if p.requires_grad and p not in optimizer.state:
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def build_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: ParallelState) -> dict[str, Any]:
    """The DCP state dict (expert shards as DTensors)."""
    experts = expert_param_names(model)
    _ensure_adam_state(model, optimizer)
    msd = {n: _wrap(n, t, experts, state) for n, t in model.state_dict().items()}
    osd = {}
    for n, p in model.named_parameters():
        st = optimizer.state[p]
        osd[n] = {k: (_wrap(n, v, experts, state) if k != "step" else v) for k, v in st.items()}
    return {"model": msd, "optim": osd}


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: ParallelState,
         extra: dict[str, Any], keep_last: int = 2) -> Path:
    """Write a DCP checkpoint of ``step`` (collective: every rank calls it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = step_dir(run_dir, step)
    with guarded("distributed checkpoint save"):
        dcp.save(build_state(model, optimizer, state), checkpoint_id=str(path))
        if state.world > 1:
            dist.barrier()
    if state.rank == 0:
        meta = {"step": step, "world": state.world, "ep": state.ep, **extra}
        (path / META).write_text(json.dumps(meta) + "\n")
        for _, old in list_dist_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if state.world > 1:
        with guarded("distributed checkpoint save"):
            dist.barrier()
    return path


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: ParallelState) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model``/``optimizer`` (resharding as needed); return ``dist.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    meta = json.loads((Path(path) / META).read_text())
    sd = build_state(model, optimizer, state)
    try:
        with guarded("distributed checkpoint load"):
            dcp.load(sd, checkpoint_id=str(path), no_dist=state.world == 1)
    except (CheckpointException, ValueError, KeyError) as e:
        raise MoelabError(f"checkpoint {str(path)!r} (saved with world={meta.get('world')}, ep={meta.get('ep')}) "
                          f"does not fit this model/layout: {_reason(e)}") from e
    _copy_back(model, optimizer, sd)
    return meta


def _reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if "Error" in ln or "mismatch" in ln]
    return (lines[-1] if lines else str(e).splitlines()[0])[:300]


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def _copy_back(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    own = model.state_dict()
    for n, t in sd["model"].items():
        own[n].copy_(_local(t))
    for n, p in model.named_parameters():
        st = optimizer.state[p]
        for k, v in sd["optim"][n].items():
            if k == "step":
                st[k] = v.clone()
            else:
                st[k].copy_(_local(v))


def export_single_process(run_dir: Path, step: int, model_full: nn.Module, optimizer: torch.optim.Optimizer,
                          extra: dict[str, Any], keep_last: int = 2) -> Path:
    """Rank 0 only: read DCP checkpoint ``step`` into an unsharded model (``no_dist``) and write it as a
    single-process checkpoint (``RUN/checkpoints``), so ``load_run``, ``moelab analyze/eval/generate``
    and the single-process trainer can use a distributed run."""
    from moelab.dist.groups import ParallelState
    from moelab.train import checkpoint as ckpt

    one = ParallelState(0, 1, 1, None, 60.0, "gloo")
    meta = load(step_dir(run_dir, step), model_full, optimizer, one)
    extra = {**extra, "data": meta["data"], "tokens_seen": meta.get("tokens_seen", 0)}
    return ckpt.save_checkpoint(Path(run_dir) / "checkpoints", step, model_full, optimizer, extra,
                                keep_last=keep_last, rng=meta["rng"])


def check_resumable(run_dir: Path, state: ParallelState) -> None:
    """Refuse resuming a single-process (safetensors) checkpoint on several ranks."""
    from moelab.train import checkpoint as ckpt

    if not list_dist_checkpoints(run_dir) and ckpt.list_checkpoints(Path(run_dir) / "checkpoints") and state.world > 1:
        raise MoelabError(
            f"run_dir={str(run_dir)!r} holds single-process checkpoints (checkpoints/, safetensors), which cannot "
            f"be resharded to world={state.world}; resume it with one process (moelab train --resume) or start a "
            "new distributed run"
        )

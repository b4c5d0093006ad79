"""Process groups of a data- and expert-parallel run (torch.distributed; gloo on CPU, NCCL on GPU).

Layout (torchtitan's "EP borrows from DP"): every rank reads its own slice of the global batch
(``dp = world size`` data-parallel replicas); ranks are arranged as a ``(world/ep, ep)`` device mesh.

- ``ep_group``  (mesh dim "ep", contiguous ranks ``[i*ep, (i+1)*ep)``): the routed experts of every
  MoE layer are sharded over it (rank j of the group owns experts ``[j*E/ep, (j+1)*E/ep)``) and
  tokens travel inside it with all-to-all.
- ``edp_group`` (mesh dim "edp", ranks with the same position in their EP group): replicas of the
  same expert shard; expert gradients are summed over it.
- ``dp_group`` (the world): every other parameter is replicated over it (DDP), and balancing
  statistics (aux-loss counts, aux-free loads, pool counts) are summed over it.

Every collective runs with ``timeout_s`` (``init_process_group(timeout=...)``): a rank that dies makes
the others fail with :class:`PeerFailure` instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moelab.errors import MoelabError, check_range


class PeerFailure(MoelabError):
    """A collective failed or timed out: another rank died or stopped answering."""


@dataclass
class ParallelState:
    """Ranks and groups of one process; ``world == 1`` runs everything locally (no collectives)."""

    rank: int
    world: int
    ep: int
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, or None when world == 1
    timeout_s: float
    backend: str

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def ep_group(self) -> Any:
        return None if self.mesh is None else self.mesh.get_group("ep")

    @property
    def edp_group(self) -> Any:
        return None if self.mesh is None else self.mesh.get_group("edp")

    @property
    def dp_group(self) -> Any:
        return dist.group.WORLD if self.world > 1 else None

    @property
    def edp(self) -> int:
        return self.world // self.ep


def check_parallel_sizes(world: int, dp: int, ep: int, num_experts: int | None = None) -> None:
    """Raise MoelabError unless ``dp`` is the world size (or 0 = auto) and ``ep`` divides it and the experts."""
    check_range("parallel.ep", ep, low=1)
    if dp not in (0, world):
        raise MoelabError(
            f"parallel.dp={dp} is not valid with {world} processes; expected parallel.dp=0 (auto) or {world} "
            "(data parallel spans every process; there is no tensor or pipeline parallelism)"
        )
    if world % ep:
        raise MoelabError(f"parallel.ep={ep} does not divide the world size {world}; choose a divisor of {world}")
    if num_experts is not None and num_experts % ep:
        raise MoelabError(
            f"parallel.ep={ep} does not divide moe.num_experts={num_experts}; choose a divisor of {num_experts}"
        )


def pick_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name not in ("gloo", "nccl"):
        raise MoelabError(f"parallel.backend={name!r} is not valid; choose one of: 'auto', 'gloo', 'nccl'")
    return name


def init_parallel(ep: int = 1, *, dp: int = 0, timeout_s: float = 300.0, backend: str = "auto",
                  num_experts: int | None = None) -> ParallelState:
    """Join (or start) the process group from torchrun's environment and build the (edp, ep) mesh.

    Without ``WORLD_SIZE`` in the environment (a plain single process) nothing is initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    check_parallel_sizes(world, dp, ep, num_experts)
    backend = pick_backend(backend)
    if world == 1 and not dist.is_initialized():
        return ParallelState(0, 1, ep, None, timeout_s, backend)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if backend == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return ParallelState(dist.get_rank(), world, ep, mesh, timeout_s, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def guarded(what: str):
    """Decorator/context turning a failed collective into :class:`PeerFailure` naming ``what``."""
    return _Guard(what)


class _Guard:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> "_Guard":
        return self

    def __exit__(self, tp, exc, tb) -> bool:
        if exc is None or isinstance(exc, MoelabError) or not isinstance(exc, (RuntimeError, dist.DistError)):
            return False
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise PeerFailure(
            f"rank {rank}: collective {self.what!r} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "another rank probably died or timed out (parallel.timeout_s); stopping"
        ) from exc


def all_reduce_sum(t: torch.Tensor, group: Any, what: str) -> torch.Tensor:
    """Sum ``t`` in place over ``group`` (a no-op without a group)."""
    if group is None:
        return t
    with guarded(what):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t

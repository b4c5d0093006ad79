"""Starting processes: ``torchrun`` for training runs, ``torch.multiprocessing.spawn`` for tests/benchmarks."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m moelab ARGS``."""
    if nproc < 1:
        raise MoelabError(f"--nproc={nproc} is out of range; expected --nproc >= 1")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "moelab", *module_args]


def _load(path: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_worker", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def _entry(rank: int, world: int, port: int, path: str, name: str, args: tuple, timeout_s: float,
           threads: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        _load(path, name)(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(path: str, name: str, world: int = 2, args: tuple = (), *, timeout_s: float = 60.0,
          threads: int = 1) -> None:
    """Run function ``name`` of the Python file ``path`` as ``fn(rank, world, *args)`` on ``world``
    gloo processes (a fresh process group on a free local port); raise if any rank fails.

    The function is loaded from its file in each child, so test files under pytest's importlib
    mode work.
    """
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, free_port(), str(path), name, args, timeout_s, threads), nprocs=world, join=True)


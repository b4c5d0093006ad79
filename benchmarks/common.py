"""Shared benchmark helpers: interleaved timing rounds, medians, peak memory, result files.

Usage::

    from common import Case, run_cases, write_results
    cases = [Case("a", fwd_a), Case("b", fwd_b)]           # callables taking no argument
    res = run_cases(cases, rounds=7, warmup=2)              # {name: {"median_ms", "times_ms", ...}}
    write_results("my_bench", payload_dict, markdown_str)  # benchmarks/results/my_bench.{json,md}

Timing: every round runs every case once, in an order rotated each round, so slow drift of a
shared machine (other jobs) hits every case alike; we report the median over rounds after
``warmup`` untimed calls of each case. Ratios between cases of one run are what to compare.

Peak memory (``peak_mib``): on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
allocated before the call. On CPU, the CPU allocator's own record: one extra call under
``torch.profiler`` with ``profile_memory=True``; its ``[memory]`` events (every allocation and
free of the c10 CPU allocator, in time order) are summed and the running maximum is the peak of
memory allocated during the call above what was allocated before it (tensors only: no Python
objects, no allocator caching, no page-level RSS). tracemalloc cannot see torch's allocations.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    fn: Callable[[], Any]
    meta: dict[str, Any] = field(default_factory=dict)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def time_interleaved(cases: list[Case], rounds: int = 7, warmup: int = 2, device: str = "cpu") -> dict[str, list[float]]:
    """Milliseconds per call of every case, ``rounds`` interleaved rounds after ``warmup`` calls."""
    for c in cases:
        for _ in range(warmup):
            c.fn()
        sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    n = len(cases)
    for r in range(rounds):
        for i in range(n):
            c = cases[(i + r) % n]
            sync(device)
            t0 = time.perf_counter()
            c.fn()
            sync(device)
            times[c.name].append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory_mib(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Peak tensor memory allocated during one call of ``fn`` above what was live before (MiB)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.device("cpu").type or str(e.device_type()).lower().endswith("cpu"):
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak / 2**20


def run_cases(cases: list[Case], rounds: int = 7, warmup: int = 2, device: str = "cpu", memory: bool = True) -> dict[str, dict[str, Any]]:
    times = time_interleaved(cases, rounds, warmup, device)
    out: dict[str, dict[str, Any]] = {}
    for c in cases:
        out[c.name] = {"median_ms": median(times[c.name]), "times_ms": times[c.name], **c.meta}
        if memory:
            out[c.name]["peak_mib"] = peak_memory_mib(c.fn, device)
    return out


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    d = results_dir or RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    pj, pm = d / f"{name}.json", d / f"{name}.md"
    pj.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    pm.write_text(markdown.rstrip() + "\n")
    return pj, pm

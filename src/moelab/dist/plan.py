"""``moelab ep-plan``: per-rank load imbalance and all-to-all bytes per token for 8..1024 ranks.

Input: a routing trace of ``moelab analyze`` (``RUN/analysis/trace_step_*.safetensors``, see
``moelab.analysis.trace``) or a run directory (its newest trace). Per MoE layer the trace gives the
kept slots per expert (``load_XE``), the mean kept experts per token (``kbar``) and ``D``.

For each rank count R:
- ``plain``: plain EP (E/R experts per rank; only when R divides E);
- ``eplb``: DeepSeek's EPLB with ``E + redundant`` slots rounded up to a multiple of R (at least R);
- ``llep``: LLEP over plain EP's placement (only when R divides E).
Reported per method: max/mean rank load (mean over layers), forward all-to-all bytes per token and
layer from :func:`moelab.dist.comm_model.bytes_per_token` (EPLB: replicas make some slots local).
The trace's token counts stand for the per-step proportions (loads scale with the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.dist.comm_model import bytes_per_token
from moelab.dist.placement.eplb import rebalance_experts
from moelab.dist.placement.llep import llep_plan, native_loads
from moelab.errors import MoelabError

DEFAULT_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class TraceLoads:
    load_XE: np.ndarray  # kept slots per layer and expert
    kbar: float
    d_model: int
    layers: list[int]


def find_trace(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    found = sorted((p / "analysis").glob("trace_step_*.safetensors")) if p.is_dir() else []
    if not found:
        raise MoelabError(f"RUN_OR_TRACE={str(p)!r} is neither a trace file nor a run with analysis/trace_step_*."
                          "safetensors; run `moelab analyze RUN` first")
    return found[-1]


def trace_loads(path: str | Path, d_model: int | None = None) -> TraceLoads:
    from moelab.analysis.trace import Trace

    tr = Trace.load(find_trace(path))
    if not tr.layers:
        raise MoelabError("the trace has no MoE layer")
    E = tr.layers[0].num_experts
    loads, slots = [], 0
    for lt in tr.layers:
        _, e, _ = lt.kept()
        loads.append(np.bincount(e, minlength=lt.num_experts)[:E])
        slots += e.size
    D = d_model or _d_model(tr)
    return TraceLoads(np.stack(loads), slots / max(1, tr.num_tokens * len(tr.layers)), D, [l.layer for l in tr.layers])


def _d_model(tr: Any) -> int:
    for lt in tr.layers:
        if lt.hidden_TD is not None:
            return int(lt.hidden_TD.shape[1])
        if lt.router_w_ED is not None:
            return int(lt.router_w_ED.shape[1])
    raise MoelabError("the trace stores no hidden states or router matrix; pass --d-model")


def _ratio(loads: np.ndarray) -> float:
    m = loads.mean()
    return float(loads.max() / m) if m else 1.0


def plan_row(tl: TraceLoads, R: int, method: str, redundant: int, dtype: str, groups: int = 1,
             nodes: int = 1) -> dict[str, Any]:
    X, E = tl.load_XE.shape
    row: dict[str, Any] = {"ranks": R, "method": method}
    if method in ("plain", "llep") and E % R:
        return {**row, "imbalance": None, "bytes_per_token": None, "note": f"{R} ranks do not divide {E} experts"}
    if method == "plain":
        ratios = [_ratio(np.array(native_loads(list(tl.load_XE[x]), R))) for x in range(X)]
        b = bytes_per_token(tl.kbar, tl.d_model, dtype, R)
    elif method == "llep":
        plans = [llep_plan([int(c) for c in tl.load_XE[x]], R) for x in range(X)]
        ratios = [p.max_over_mean() for p in plans]
        b = bytes_per_token(tl.kbar, tl.d_model, dtype, R)
        row["weight_copies"] = sum(len(p.transfers) for p in plans) / X
    else:
        slots = max(R, -(-(E + redundant) // R) * R)
        plan = rebalance_experts(torch.tensor(tl.load_XE, dtype=torch.float64), slots, groups, nodes, R)
        ratios = [_ratio(plan.gpu_loads(torch.tensor(tl.load_XE))[x].numpy()) for x in range(X)]
        b = float(np.mean([_eplb_bytes(plan, x, tl, R, dtype) for x in range(X)]))
        row["slots"] = slots
    return {**row, "imbalance": float(np.mean(ratios)), "bytes_per_token": b}


def _eplb_bytes(plan, x: int, tl: TraceLoads, R: int, dtype: str) -> float:
    per = plan.phy2log.shape[1] // R
    ranks_of = [set() for _ in range(tl.load_XE.shape[1])]
    for s, e in enumerate(plan.phy2log[x].tolist()):
        ranks_of[e].add(s // per)
    return bytes_per_token(tl.kbar, tl.d_model, dtype, R, [len(r) for r in ranks_of], list(tl.load_XE[x]))


def ep_plan(path: str | Path, ranks: list[int], redundant: int, methods: list[str], dtype: str = "bfloat16",
            groups: int = 1, nodes: int = 1) -> list[dict[str, Any]]:
    tl = trace_loads(path)
    return [plan_row(tl, R, m, redundant, dtype, groups, nodes) for R in ranks for m in methods]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'ranks':>6} {'method':>6} {'max/mean load':>14} {'a2a bytes/token/layer':>22}"]
    for r in rows:
        imb = "n/a" if r["imbalance"] is None else f"{r['imbalance']:.3f}"
        b = "n/a" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.0f}"
        lines.append(f"{r['ranks']:>6} {r['method']:>6} {imb:>14} {b:>22}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m in sorted({r["method"] for r in rows}):
        pts = [(r["ranks"], r["imbalance"], r["bytes_per_token"]) for r in rows if r["method"] == m and r["imbalance"]]
        if pts:
            xs, imb, b = zip(*pts)
            axes[0].plot(xs, imb, marker="o", label=m)
            axes[1].plot(xs, b, marker="o", label=m)
    for ax, title in zip(axes, ("max/mean rank load", "all-to-all bytes per token per layer")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

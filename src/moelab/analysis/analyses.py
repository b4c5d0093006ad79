"""The routing analyses of a run: trajectories from metrics.jsonl and analyses of routing traces.

``analyze_trace(trace)`` computes, per MoE layer, every trace-level analysis of
:mod:`moelab.analysis.metrics`; ``compare_traces(a, b)`` the stability between two checkpoints;
``analyze_run(run_dir)`` does both for chosen checkpoints of a run, adds the training-time
trajectories and writes ``RUN/analysis/`` (traces as safetensors, results as analysis.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import metrics as M
from moelab.analysis.trace import (
    Trace, check_same_model, checkpoint_checksum, config_hash, list_checkpoints, read_json, read_jsonl, trace_run,
)
from moelab.errors import MoelabError, check_range


def _clean(x: Any) -> Any:
    """JSON-safe: numpy to lists/floats, NaN to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def analyze_trace(trace: Trace, *, top_n: int = 8, seg_len: int = 16, cache_factor: int = 2) -> dict[str, Any]:
    """All trace-level analyses, per MoE layer, plus cross-layer consistency.

    Per layer: loads and balance; router entropy; experts per token (histogram, and vs token loss
    for variable k); expert x domain distribution and the specialisation score; top tokens per
    expert; the co-activation matrix; geometric coupling (needs hidden states and a router matrix);
    local routing consistency (consecutive-token overlap, SRP with a group of k experts, SCH with
    a cache of ``cache_factor`` x k experts, the paper's recommended size).
    """
    T = trace.num_tokens
    valid = trace.valid_T.astype(bool)
    nd = max(len(trace.domains), int(trace.domain_T.max()) + 1 if T else 1)
    out: dict[str, Any] = {"step": trace.step, "num_tokens": int(valid.sum()), "domains": trace.domains,
                           "layers": []}
    top1 = []
    if T and valid.any():  # SRP windows cannot be longer than the traced sequences
        seg_len = max(1, min(seg_len, int(np.bincount(trace.seq_T[valid]).max())))
    for lt in trace.layers:
        t, e, w = lt.kept()
        real = valid[t]
        t, e, w = t[real], e[real], w[real]
        E = lt.num_experts
        counts = M.expert_counts(e, E)
        ept = M.experts_per_token(t, T)[valid]
        mask = M.choice_mask(t, e, T, E)
        k_mean = float(ept.mean()) if ept.size else float("nan")
        k_int = max(1, int(round(k_mean))) if math.isfinite(k_mean) else 1
        dom_EN = M.expert_domain_counts(t, e, trace.domain_T, T, E, nd)
        r: dict[str, Any] = {
            "layer": lt.layer, "num_experts": E, "counts": counts, **M.load_balance(counts),
            "router_entropy": M.router_entropy(lt.probs_TE, valid) if lt.probs_TE is not None else float("nan"),
            "experts_per_token_mean": k_mean,
            "experts_per_token_hist": np.bincount(ept, minlength=1) if ept.size else np.zeros(1, np.int64),
            "domain_counts_EN": dom_EN,
            "specialisation": M.specialisation_score(dom_EN),
            "top_tokens": M.top_tokens_per_expert(trace.token_ids_T, t, e, E, n=top_n),
            "coactivation_EE": M.coactivation(t, e, T, E),
            "consecutive_overlap": M.consecutive_token_overlap(mask[valid], trace.seq_T[valid]),
            "srp": M.segment_routing_best_performance(mask[valid], trace.seq_T[valid], seg_len, min(k_int, E)),
            "sch": M.segment_cache_best_hit_rate(mask[valid], trace.seq_T[valid], min(cache_factor * k_int, E)),
            "srp_seg_len": seg_len, "sch_cache_size": min(cache_factor * k_int, E),
        }
        if lt.hidden_TD is not None and lt.router_w_ED is not None:
            r["geometry"] = M.geometric_coupling(lt.router_w_ED, lt.hidden_TD, t, e)
        if trace.loss_T is not None and ept.size and len(np.unique(ept)) > 1:
            r["experts_vs_loss"] = M.experts_vs_loss(ept, trace.loss_T[valid])
        out["layers"].append(r)
        top1.append(M.top1_expert(t, e, w, T, E)[valid])
    out["adjacent_layer_consistency"] = M.adjacent_layer_consistency(np.stack(top1)) if len(top1) > 1 else np.zeros(0)
    return out


def compare_traces(trace: Trace, reference: Trace) -> dict[str, Any]:
    """Routing stability between two checkpoints traced on the same tokens, per layer.

    ``changed_frac``: fraction of tokens whose expert set differs; ``saturation``: OLMoE's router
    saturation of ``trace`` with respect to ``reference`` (normally the final checkpoint).
    """
    check_same_model(reference, trace)
    T, valid = trace.num_tokens, trace.valid_T.astype(bool)
    rows = []
    for lt in trace.layers:
        ref = reference.layer(lt.layer)
        a, b = lt.mask_TE(T), ref.mask_TE(T)
        rows.append({"layer": lt.layer, "changed_frac": M.routing_change_fraction(a, b, valid),
                     "saturation": M.router_saturation(a, b, valid)})
    return {"step": trace.step, "reference_step": reference.step, "layers": rows}


@dataclass
class RunAnalysis:
    """Everything ``analyze_run`` computed (``summary()`` gives the JSON-able view)."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary_json: dict[str, Any]
    traces: dict[int, Trace] = field(default_factory=dict)
    trace_results: dict[int, dict[str, Any]] = field(default_factory=dict)
    stability: list[dict[str, Any]] = field(default_factory=list)
    trace_error: str | None = None

    def trajectories(self) -> dict[str, Any]:
        """Per-layer balance stats over training steps (from metrics.jsonl)."""
        out = {}
        for key in ("load_max_over_mean", "load_cv", "dropped_frac", "router_entropy", "experts_per_token",
                    "unused_experts", "bias_norm"):
            steps, vals = M.balance_trajectory(self.metrics, key)
            if vals.size and np.isfinite(vals).any():
                out[key] = {"steps": steps, "values": vals}
        return out

    def summary(self) -> dict[str, Any]:
        return _clean({
            "run_dir": str(self.run_dir), "summary": self.summary_json,
            "traced_steps": sorted(self.traces), "trace_error": self.trace_error,
            "analyses": {str(s): _headline(r) for s, r in self.trace_results.items()},
            "stability": self.stability,
        })


def _headline(r: dict[str, Any]) -> dict[str, Any]:
    """The scalar results of one trace analysis (what `moelab analyze` prints)."""
    keys = ("layer", "max_over_mean", "cv", "unused", "router_entropy", "experts_per_token_mean",
            "specialisation", "consecutive_overlap", "srp", "sch")
    layers = []
    for x in r["layers"]:
        row = {k: x[k] for k in keys}
        if "geometry" in x:
            row["router_hidden_cos"] = x["geometry"]["mean_router_hidden_cos"]
            row["router_router_cos"] = x["geometry"]["mean_offdiag_router_cos"]
        if "experts_vs_loss" in x:
            row["experts_loss_spearman"] = x["experts_vs_loss"]["spearman"]
        layers.append(row)
    return {"num_tokens": r["num_tokens"], "layers": layers,
            "adjacent_layer_consistency": r["adjacent_layer_consistency"]}


def load_run_records(run_dir: str | Path) -> tuple[dict, list, list, dict]:
    """``(config, metrics records, eval records, summary)`` of a run directory (INTERFACES.md layout)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MoelabError(f"run_dir={str(run_dir)!r} is not a directory")
    if not (run_dir / "config.json").is_file():
        raise MoelabError(f"run_dir={str(run_dir)!r} has no config.json: not a moelab run directory")
    config = read_json(run_dir / "config.json")
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    return config, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl"), summary


def pick_steps(steps: list[int], max_traces: int) -> list[int]:
    """Up to ``max_traces`` checkpoints spread over training, always including the last."""
    if max_traces < 1:
        raise MoelabError(f"max_traces={max_traces} must be >= 1")
    if len(steps) <= max_traces:
        return list(steps)
    if max_traces == 1:  # linspace(0, n-1, 1) is [0]: the first step, not the promised last
        return [steps[-1]]
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, max_traces)).astype(int))
    return [steps[i] for i in idx]


def analyze_run(run_dir: str | Path, *, steps: list[int] | None = None, max_traces: int = 3,
                num_windows: int = 16, seed: int = 0, trace: bool = True, save: bool = True,
                traces: dict[int, Trace] | None = None, progress: bool = False) -> RunAnalysis:
    """Analyse a run: training trajectories plus routing traces at chosen checkpoints.

    Traces are taken at ``steps`` (default: up to ``max_traces`` checkpoints spread over training,
    the last included) on the same seeded validation windows; already-saved traces in
    ``RUN/analysis/trace_step_XXXXXX.safetensors`` with the same seed are reused. ``traces`` passes
    traces directly (then nothing is traced). With ``trace=False`` only metrics.jsonl is used.
    ``progress`` shows a tqdm bar over the checkpoints traced (on stderr).
    Stability is reported between consecutive traced checkpoints and against the last one.
    """
    run_dir = Path(run_dir)
    check_range("num_windows", num_windows, low=1)
    check_range("max_traces", max_traces, low=1)
    config, metrics, evals, summary = load_run_records(run_dir)
    ra = RunAnalysis(run_dir=run_dir, config=config, metrics=metrics, evals=evals, summary_json=summary)
    if traces is not None:
        ra.traces = dict(traces)
    elif trace:
        all_steps = list_checkpoints(run_dir)
        chosen = pick_steps(all_steps, max_traces) if steps is None else list(steps)
        for s in chosen:
            if s not in all_steps:
                raise MoelabError(f"step={s} has no checkpoint; choose one of: {all_steps}")
        adir = run_dir / "analysis"
        cache: dict = {}
        try:
            from tqdm.auto import tqdm

            for s in tqdm(chosen, desc="tracing checkpoints", unit="ckpt", disable=None if progress else True, leave=False):
                p = adir / f"trace_step_{s:06d}.safetensors"
                tr = None
                if p.is_file():  # reuse a saved trace only if it is of this very checkpoint and sample
                    tr = Trace.load(p)
                    if (tr.seed != seed or tr.meta.get("num_windows") != num_windows
                            or tr.config_hash != config_hash(config)
                            or tr.weights_checksum != checkpoint_checksum(run_dir, s)):
                        tr = None
                if tr is None:
                    tr = trace_run(run_dir, s, num_windows=num_windows, seed=seed, window_cache=cache)
                    tr.meta["num_windows"] = num_windows
                    if save:
                        tr.save(p)
                ra.traces[s] = tr
        except MoelabError as e:
            if not ra.traces:
                ra.trace_error = str(e)
            else:
                raise
    for s, tr in sorted(ra.traces.items()):
        ra.trace_results[s] = analyze_trace(tr)
    ordered = sorted(ra.traces)
    if len(ordered) > 1:
        last = ra.traces[ordered[-1]]
        for a, b in zip(ordered[:-1], ordered[1:]):
            row = compare_traces(ra.traces[a], ra.traces[b])
            row["saturation_vs_final"] = compare_traces(ra.traces[a], last)["layers"]
            ra.stability.append(row)
    if save:
        (run_dir / "analysis").mkdir(exist_ok=True)
        (run_dir / "analysis" / "analysis.json").write_text(json.dumps(ra.summary(), indent=1))
    return ra

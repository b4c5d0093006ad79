"""`compress-compare`: every method at every budget on one run, against the unmodified model.

:func:`compress_compare(run_dir, methods, keeps, out_dir, ...)` loads the run once, calibrates the
unmodified model once (the same sample for every method), applies each method x budget to a fresh copy
in memory, and evaluates validation perplexity (overall and per domain) with the trainer's
``evaluate``. For skipping methods the budget ``keep`` is the fraction of routed expert computations
kept (skip rate = 1 - keep) and active parameters count the realised experts per token.
Writes ``compare.json``, ``compare.md`` (the table) and ``compare.html`` (the table and quality-vs-size
curves, the PNG embedded).
"""

from __future__ import annotations

import base64
import copy
import json
import time
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError, check_range
from moelab.ops.apply import expert_counts, param_counts
from moelab.ops.calibrate import CalibrationConfig, calibrate
from moelab.ops.runner import apply_op, canonical, method_family, open_run

DEFAULT_METHODS = "frequency,soft_count,ean,reap,easy_ep,tcess,m_smoe,mc_smoe,hc_smoe,sub_moe,dern,threshold,modes"


def _evaluate(model, ctx, max_batches: int | None, batch_size: int) -> dict[str, Any]:
    from moelab.train.trainer import evaluate

    cfg = ctx.loaded.config
    return evaluate(model, ctx.prepared.tokens["val"], ctx.loaded.tokenizer, list(ctx.prepared.splits.domains),
                    seq_len=cfg.data.seq_len, batch_size=batch_size, max_batches=max_batches,
                    cache_dir=cfg.data.cache_dir)


def _row(method: str, family: str, keep, model, ev: dict, manifest: dict | None, seconds: float) -> dict[str, Any]:
    ept = None
    if manifest and "experts_per_token" in manifest:
        ept = {int(k): v for k, v in manifest["experts_per_token"].items()}
    counts = expert_counts(model)
    params = param_counts(model, ept)
    saved = _factored_saving(model, manifest)
    params = {"total": params["total"] - saved[0], "active": params["active"] - saved[1]}
    from moelab.models.moe_protocol import moe_layers

    k = {s.index: float(s.layer.cfg.k) for s in moe_layers(model)}
    ept = ept or k
    return {"method": method, "family": family, "keep": keep, "experts": sum(counts.values()) / len(counts),
            "experts_per_token": sum(ept.values()) / len(ept), **params,
            "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"],
            "per_domain": {d: v["ppl"] for d, v in ev["per_domain"].items()},
            "skip_rate": None if manifest is None else manifest.get("realised_rate"), "seconds": seconds}


def _factored_saving(model, manifest: dict | None) -> tuple[int, int]:
    """(total, active) parameters saved by storing experts factored (MC-SMoE's ``stored_expert_params``)."""
    from moelab.models.moe_protocol import moe_layers

    if not manifest:
        return 0, 0
    total = active = 0.0
    for site in moe_layers(model):
        info = manifest.get("layers", {}).get(str(site.index), {})
        if "stored_expert_params" in info:
            dense = sum(p.numel() for p in site.layer.experts.parameters())
            total += dense - info["stored_expert_params"]
            active += (dense - info["stored_expert_params"]) * site.layer.cfg.k / site.layer.cfg.num_experts
    return int(total), int(round(active))


def compress_compare(run_dir: str | Path, methods: list[str], keeps: list[float], out_dir: str | Path, *,
                     ccfg: CalibrationConfig | None = None, eval_batches: int | None = 4, eval_batch_size: int = 16,
                     progress: bool = True) -> dict[str, Any]:
    """The comparison (module docstring); returns ``{"rows": [...], "baseline": {...}, ...}``."""
    ccfg = (ccfg or CalibrationConfig()).validate()
    for k in keeps:
        check_range("keep", k, low=0.0, high=1.0, low_inclusive=False)
    fams = {canonical(m): method_family(m) for m in methods}
    if not fams:
        raise MoelabError("methods is empty; choose some of: " + DEFAULT_METHODS)
    ctx = open_run(run_dir, ccfg)
    base = ctx.loaded.model
    t0 = time.perf_counter()
    rows = [_row("none", "baseline", 1.0, base, _evaluate(base, ctx, eval_batches, eval_batch_size), None,
                 time.perf_counter() - t0)]
    stats = calibrate(base, ctx.windows, ccfg)
    jobs = [(m, f, k) for m, f in fams.items() for k in keeps]
    for m, fam, keep in _bar(jobs, progress):
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        try:
            man = apply_op(model, fam, m, float(keep), ctx, stats, ccfg)
            rows.append(_row(m, fam, keep, model, _evaluate(model, ctx, eval_batches, eval_batch_size), man,
                             time.perf_counter() - t0))
        except MoelabError as e:  # e.g. a budget below k: recorded, not fatal
            rows.append({"method": m, "family": fam, "keep": keep, "error": str(e)})
    result = {"run_dir": str(run_dir), "step": ctx.loaded.step, "calibration_tokens": ctx.windows.tokens,
              "eval_batches_per_domain": eval_batches, "eval_batch_size": eval_batch_size,
              "domains": list(ctx.prepared.splits.domains), "rows": rows}
    write_outputs(result, Path(out_dir))
    return result


def _bar(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="compress-compare", unit="model")


# --------------------------------------------------------------------------- outputs
def markdown_table(result: dict[str, Any]) -> str:
    rows, doms = result["rows"], result["domains"]
    base = rows[0]
    head = ["method", "family", "keep", "experts/layer", "experts/token", "params", "active", "val ppl", "Δ ppl %",
            *[f"ppl {d}" for d in doms], "skip rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['family']} | {r['keep']} | error: {r['error']} |")
            continue
        d = 100.0 * (r["val_ppl"] / base["val_ppl"] - 1.0)
        sr = "" if r.get("skip_rate") is None else f"{r['skip_rate']:.3f}"
        cells = [r["method"], r["family"], f"{r['keep']:g}", f"{r['experts']:.2f}", f"{r['experts_per_token']:.2f}",
                 f"{r['total']:,}",
                 f"{r['active']:,}", f"{r['val_ppl']:.2f}", f"{d:+.1f}",
                 *[f"{r['per_domain'].get(x, float('nan')):.2f}" for x in doms], sr]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    base = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    methods = sorted({r["method"] for r in rows[1:]})
    colors = plt.get_cmap("tab20")(range(len(methods)))
    styles = {"prune": "-", "merge": "--", "skip": ":"}
    for ax, key, label in ((axes[0], "total", "parameters (fraction of unmodified)"),
                           (axes[1], "keep", "budget: fraction of experts (skip: of expert computations) kept")):
        for m, c in zip(methods, colors):
            mine = [r for r in rows[1:] if r["method"] == m]
            pts = sorted(((r[key] / base[key] if key == "total" else r["keep"]), r["val_ppl"]) for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=c, ls=styles.get(mine[0]["family"], "-"),
                    label=f"{m} ({mine[0]['family']})")
        ax.axhline(base["val_ppl"], color="k", ls="--", lw=1, label="unmodified")
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("quality vs size: " + str(result["run_dir"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _html_table(md: str) -> str:
    import html

    rows = [ln.strip().strip("|").split("|") for ln in md.splitlines() if ln.strip() and not ln.startswith("|---")]
    cell = lambda tag, c: f"<{tag}>{html.escape(c.strip())}</{tag}>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell("th" if i == 0 else "td", c) for c in r) + "</tr>" for i, r in enumerate(rows))
    return f"<table border='1' cellspacing='0' cellpadding='3'>{body}</table>"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_table(result)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(md)
    png = plot_curves(result, out / "compare_curves.png")
    b64 = base64.b64encode(png.read_bytes()).decode()
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>compress-compare</title></head><body>"
            f"<h1>compress-compare: {result['run_dir']} (step {result['step']})</h1>"
            f"<p>calibration tokens {result['calibration_tokens']}, eval batches per domain "
            f"{result['eval_batches_per_domain']} x {result['eval_batch_size']}</p>"
            f"<img src='data:image/png;base64,{b64}' alt='quality vs size'>"
            f"{_html_table(md)}</body></html>")
    (out / "compare.html").write_text(html)

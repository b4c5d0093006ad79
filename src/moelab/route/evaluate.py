"""Sweep routers into cost–quality curves, compute metrics with bootstrap CIs, write reports.

Shapes: K trade-off values swept, P test prompts, M models, B bootstrap resamples.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError
from moelab.route import metrics as mt
from moelab.route.base import DEFAULT_MUS, MODEL_ROUTERS, ModelRouter, build_router
from moelab.route.data import RoutingDataset
from moelab.route.features import TfidfSvdFeaturizer


@dataclass
class Sweep:
    """Per-prompt outcomes of a router at each swept trade-off."""

    router: str
    mus_K: np.ndarray
    idx_KP: np.ndarray
    quality_KP: np.ndarray
    cost_KP: np.ndarray
    fit_s: float = 0.0
    route_s: float = 0.0
    extra: dict = field(default_factory=dict)


def sweep(router: ModelRouter, test: RoutingDataset, x_PD: np.ndarray | None = None, mus=DEFAULT_MUS) -> Sweep:
    t0 = time.perf_counter()
    q_PM, c_PM = router.estimate(test, x_PD)
    idx_KP = router.decide_grid(q_PM, c_PM, mus)
    route_s = time.perf_counter() - t0
    ar = np.arange(test.n_prompts)
    quality_KP = test.scores_PM[ar[None], idx_KP]
    cost_KP = np.stack([router.paid_cost(idx, test.costs_PM) for idx in idx_KP])
    return Sweep(router.name, np.asarray(mus), idx_KP, quality_KP, cost_KP, route_s=route_s)


def _metrics(sw: Sweep, test: RoutingDataset, w_PB: np.ndarray, oracle: Sweep | None, mid_K=None) -> dict:
    """Metrics for each bootstrap weight column of ``w_PB`` (weights sum to 1 per column)."""
    q_KB, c_KB = sw.quality_KP @ w_PB, sw.cost_KP @ w_PB
    mq_MB, mc_MB = test.scores_PM.T @ w_PB, test.costs_PM.T @ w_PB
    M = len(test.models)
    two = M == 2
    strong = int(np.argmax(test.costs_PM.mean(0)))
    frac_KB = (sw.idx_KP == strong).astype(float) @ w_PB if two else None
    out: dict[str, list] = {k: [] for k in ("aiq", "apgr", "cpt50", "cpt80", "arena", "q_at_25", "q_at_50",
                                               "gap_to_oracle", "arena_quality", "arena_cost")}
    for b in range(w_PB.shape[1]):
        lo, hi = mc_MB[:, b].min(), mc_MB[:, b].max()
        # RouterBench's zero router: every router may be mixed with the single models, so their
        # points join the hull (a lone single model then scores the chord, like random mixing).
        a = mt.aiq(np.concatenate([c_KB[:, b], mc_MB[:, b]]), np.concatenate([q_KB[:, b], mq_MB[:, b]]), lo, hi)
        out["aiq"].append(a)
        if oracle is not None:
            oq, oc = oracle.quality_KP @ w_PB[:, b], oracle.cost_KP @ w_PB[:, b]
            ao = mt.aiq(np.concatenate([oc, mc_MB[:, b]]), np.concatenate([oq, mq_MB[:, b]]), lo, hi)
            out["gap_to_oracle"].append(ao - a)
        else:
            out["gap_to_oracle"].append(float("nan"))
        if two and mq_MB[strong, b] > mq_MB[1 - strong, b]:
            qs, qw = mq_MB[strong, b], mq_MB[1 - strong, b]
            out["apgr"].append(mt.apgr(frac_KB[:, b], q_KB[:, b], qw, qs))
            out["cpt50"].append(mt.cpt(frac_KB[:, b], q_KB[:, b], qw, qs, 0.5))
            out["cpt80"].append(mt.cpt(frac_KB[:, b], q_KB[:, b], qw, qs, 0.8))
        else:  # APGR/CPT need a strong (expensive) model that is also the better one
            for k in ("apgr", "cpt50", "cpt80"):
                out[k].append(float("nan"))
        ar = [mt.arena_score(q, c) for q, c in zip(q_KB[:, b], c_KB[:, b])]
        kb = int(np.argmax(ar))
        out["arena"].append(ar[kb])
        out["arena_quality"].append(q_KB[kb, b])
        out["arena_cost"].append(c_KB[kb, b])
        out["q_at_25"].append(mt.quality_at_budget(c_KB[:, b], q_KB[:, b], 0.25 * hi))
        out["q_at_50"].append(mt.quality_at_budget(c_KB[:, b], q_KB[:, b], 0.50 * hi))
    return {k: np.array(v, float) for k, v in out.items()}


def evaluate_sweep(sw: Sweep, test: RoutingDataset, oracle: Sweep | None = None, n_boot: int = 200,
                   seed: int = 0) -> dict:
    """Point estimates plus 95% percentile-bootstrap CIs over prompts, curve and per-category view."""
    P = test.n_prompts
    w_full = np.full((P, 1), 1.0 / P)
    point = {k: float(v[0]) for k, v in _metrics(sw, test, w_full, oracle).items()}
    ci = {}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx_BP = rng.integers(0, P, size=(n_boot, P))
        w_PB = np.zeros((P, n_boot))
        for b in range(n_boot):
            w_PB[:, b] = np.bincount(idx_BP[b], minlength=P) / P
        boots = _metrics(sw, test, w_PB, oracle)
        for k, v in boots.items():
            v = v[np.isfinite(v)]
            ci[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [None, None]
    q_K, c_K = sw.quality_KP.mean(1), sw.cost_KP.mean(1)
    hi = test.costs_PM.mean(0).max()
    ok = np.flatnonzero(c_K <= 0.5 * hi * (1 + 1e-9))
    k50 = int(ok[np.argmax(q_K[ok])]) if len(ok) else int(np.argmin(c_K))
    cats = sorted(set(test.categories))
    cat_arr = np.array(test.categories)
    per_cat = {c: {"n": int((cat_arr == c).sum()),
                   "quality": float(sw.quality_KP[k50, cat_arr == c].mean()),
                   "cost": float(sw.cost_KP[k50, cat_arr == c].mean()),
                   "share": {m: float((sw.idx_KP[k50, cat_arr == c] == j).mean()) for j, m in enumerate(test.models)}}
               for c in cats}
    return {"router": sw.router, "metrics": point, "ci95": ci,
            "curve": {"mu": sw.mus_K.tolist(), "cost": c_K.tolist(), "quality": q_K.tolist()},
            "per_category_at_50pct_budget": per_cat, "fit_s": sw.fit_s, "route_s": sw.route_s}


def compare(ds: RoutingDataset, routers: list[str], test_frac: float = 0.3, group_by: str = "prompt",
            seed: int = 0, n_boot: int = 200, feature_dim: int = 128, router_options: dict | None = None,
            cache_dir: str | Path | None = None, log=print) -> dict:
    """Split ``ds``, fit one featurizer on the training texts, fit and sweep every router on the test
    split, and return a JSON-able result (the oracle is always evaluated, for the gap)."""
    for r in routers:
        MODEL_ROUTERS.get(r)  # raises with the valid names
    router_options = router_options or {}
    train, test = ds.split(test_frac=test_frac, group_by=group_by, seed=seed)
    t0 = time.perf_counter()
    feat = TfidfSvdFeaturizer(dim=feature_dim, seed=seed)
    x_tr = x_te = None
    needs = any(MODEL_ROUTERS.get(r).needs_features for r in routers)
    if needs:
        feat.fit_cached(train.require_texts(), cache_dir)
        x_tr = feat.transform(train.require_texts(), cache_dir)
        x_te = feat.transform(test.require_texts(), cache_dir)
    feat_s = time.perf_counter() - t0
    log(f"{ds.name}: {train.n_prompts} train / {test.n_prompts} test prompts, models {ds.models}; "
        f"features {feat_s:.1f}s")
    oracle = build_router("oracle").fit(train)
    osw = sweep(oracle, test)
    results = {}
    for name in routers:
        r = build_router(name, **router_options.get(name, {}))
        t0 = time.perf_counter()
        r.fit(train, featurizer=feat if r.needs_features else None, x_ND=x_tr if r.needs_features else None)
        fit_s = time.perf_counter() - t0
        sw = sweep(r, test, x_te if r.needs_features else None)
        sw.fit_s = fit_s
        results[name] = evaluate_sweep(sw, test, osw, n_boot=n_boot, seed=seed)
        m = results[name]["metrics"]
        log(f"  {name:12s} fit {fit_s:6.2f}s  AIQ {m['aiq']:.4f}  Q@50% {m['q_at_50']:.4f}")
    singles = {m: {"quality": float(test.scores_PM[:, j].mean()), "cost": float(test.costs_PM[:, j].mean())}
               for j, m in enumerate(test.models)}
    return {"dataset": ds.name, "n_train": train.n_prompts, "n_test": test.n_prompts, "models": test.models,
            "single_models": singles, "split": {"test_frac": test_frac, "group_by": group_by, "seed": seed},
            "n_boot": n_boot, "feature_s": feat_s, "routers": results}


# ---------------------------------------------------------------------- reporting
def _fmt(v, ci=None, pct=False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    s = f"{100 * v:.1f}" if pct else f"{v:.3f}"
    if ci and ci[0] is not None:
        lo, hi = ci
        s += f" [{100 * lo:.1f}, {100 * hi:.1f}]" if pct else f" [{lo:.3f}, {hi:.3f}]"
    return s


TABLE_COLUMNS = [("AIQ", "aiq", False), ("APGR", "apgr", False), ("CPT50%", "cpt50", True),
                 ("CPT80%", "cpt80", True), ("Arena", "arena", True), ("Q@25%", "q_at_25", True),
                 ("Q@50%", "q_at_50", True), ("gap-oracle", "gap_to_oracle", False)]


def format_table(res: dict) -> str:
    """Markdown table of the comparison (quality and arena in %, 95% bootstrap CIs in brackets)."""
    head = "| router | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " | fit s |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name, r in res["routers"].items():
        m, ci = r["metrics"], r["ci95"]
        cells = [_fmt(m[k], ci.get(k), pct) for _, k, pct in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['fit_s']:.2f} |")
    singles = ", ".join(f"{m}: q={v['quality']:.3f}, ${v['cost']:.2e}/prompt" for m, v in res["single_models"].items())
    return "\n".join(lines) + f"\n\nsingle models on the test split: {singles}"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(res: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` and ``report.html`` (curves and per-category bars, PNG base64)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(res["routers"].items()):
        c, q = np.array(r["curve"]["cost"]), np.array(r["curve"]["quality"])
        o = np.argsort(c)
        ax.plot(c[o], q[o], marker=".", ms=3, lw=1, ls=["-", "--", ":"][(i // 10) % 3], label=name)
    for m, v in res["single_models"].items():
        ax.scatter([v["cost"]], [v["quality"]], marker="*", s=120, zorder=5)
        ax.annotate(m.split("/")[-1], (v["cost"], v["quality"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per prompt (USD)")
    ax.set_ylabel("mean quality")
    ax.set_title(f"{res['dataset']}: cost–quality curves (test split)")
    ax.legend(fontsize=7)
    curves = _png(fig)
    plt.close(fig)
    first = next(iter(res["routers"].values()))
    cats = sorted(first["per_category_at_50pct_budget"].items(), key=lambda kv: -kv[1]["n"])[:20]
    cat_names = [c for c, _ in cats]
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(cat_names) * max(1, len(res["routers"])) / 3), 4.5))
    wbar = 0.8 / max(1, len(res["routers"]))
    for i, (name, r) in enumerate(res["routers"].items()):
        vals = [r["per_category_at_50pct_budget"][c]["quality"] for c in cat_names]
        ax.bar(np.arange(len(cat_names)) + i * wbar, vals, wbar, label=name)
    ax.set_xticks(np.arange(len(cat_names)) + 0.4 - wbar / 2)
    ax.set_xticklabels([c[:18] for c in cat_names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("quality at 50% budget")
    ax.set_title("per-category quality (largest categories)")
    ax.legend(fontsize=7)
    bars = _png(fig)
    plt.close(fig)
    table = format_table(res)
    doc = (f"<html><head><meta charset='utf-8'><title>moelab route compare: {html.escape(res['dataset'])}</title>"
           f"</head><body><h1>{html.escape(res['dataset'])}</h1><p>{res['n_train']} train / {res['n_test']} "
           f"test prompts; 95% bootstrap CIs over prompts ({res['n_boot']} resamples)</p>"
           f"<pre>{html.escape(table)}</pre><img src='data:image/png;base64,{curves}'/>"
           f"<img src='data:image/png;base64,{bars}'/></body></html>")
    (out / "report.html").write_text(doc)
    return {"json": out / "results.json", "html": out / "report.html"}

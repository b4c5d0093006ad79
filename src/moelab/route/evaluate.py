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


PAIRED_KEYS = ("aiq", "gap_closed", "q_at_35best")
_KEYS = ("aiq", "aiq_own_points", "aiq_zero_router", "aiq_oracle", "gap_closed", "apgr", "apgr_routellm",
         "cpt50", "cpt80", "arena", "q_at_25", "q_at_50", "q_at_35best", "gap_to_oracle", "arena_quality",
         "arena_cost")


def _two_model_metrics(out, frac_K, q_K, qw, qs) -> None:
    if frac_K is None or not qs > qw:  # APGR/CPT need a strong (expensive) model that is also better
        for k in ("apgr", "apgr_routellm", "cpt50", "cpt80"):
            out[k].append(float("nan"))
        return
    out["apgr"].append(mt.apgr(frac_K, q_K, qw, qs))
    out["apgr_routellm"].append(mt.apgr_routellm(frac_K, q_K, qw, qs))
    out["cpt50"].append(mt.cpt(frac_K, q_K, qw, qs, 0.5))
    out["cpt80"].append(mt.cpt(frac_K, q_K, qw, qs, 0.8))


def _metrics(sw: Sweep, test: RoutingDataset, w_PB: np.ndarray, oracle: Sweep | None) -> dict:
    """Metrics for each bootstrap weight column of ``w_PB`` (weights sum to 1 per column).
    Conventions: see :mod:`moelab.route.metrics` (``aiq`` vs ``aiq_own_points``, ``apgr`` vs
    ``apgr_routellm``). ``gap_closed`` = (aiq - zero router) / (oracle - zero router), the share of
    the single-model-mix → oracle AIQ gap the router closes. ``q_at_35best``: best quality at a mean
    cost within 35% of the best single model's cost."""
    q_KB, c_KB = sw.quality_KP @ w_PB, sw.cost_KP @ w_PB
    mq_MB, mc_MB = test.scores_PM.T @ w_PB, test.costs_PM.T @ w_PB
    two = len(test.models) == 2
    strong = int(np.argmax(test.costs_PM.mean(0)))
    best = int(np.argmax(test.scores_PM.mean(0) - 1e-12 * test.costs_PM.mean(0)))
    frac_KB = (sw.idx_KP == strong).astype(float) @ w_PB if two else None
    out: dict[str, list] = {k: [] for k in _KEYS}
    for b in range(w_PB.shape[1]):
        lo, hi = mc_MB[:, b].min(), mc_MB[:, b].max()
        a = mt.aiq(np.concatenate([c_KB[:, b], mc_MB[:, b]]), np.concatenate([q_KB[:, b], mq_MB[:, b]]), lo, hi)
        zero = mt.aiq(mc_MB[:, b], mq_MB[:, b], lo, hi)
        out["aiq"].append(a)
        out["aiq_own_points"].append(mt.aiq(c_KB[:, b], q_KB[:, b], lo, hi, below="zero"))
        out["aiq_zero_router"].append(zero)
        ao = float("nan")
        if oracle is not None:
            oq, oc = oracle.quality_KP @ w_PB[:, b], oracle.cost_KP @ w_PB[:, b]
            ao = mt.aiq(np.concatenate([oc, mc_MB[:, b]]), np.concatenate([oq, mq_MB[:, b]]), lo, hi)
        out["aiq_oracle"].append(ao)
        out["gap_to_oracle"].append(ao - a)
        out["gap_closed"].append((a - zero) / (ao - zero) if ao - zero > 1e-12 else float("nan"))
        _two_model_metrics(out, None if frac_KB is None else frac_KB[:, b], q_KB[:, b],
                           mq_MB[1 - strong, b] if two else 0.0, mq_MB[strong, b])
        ar = [mt.arena_score(q, c) for q, c in zip(q_KB[:, b], c_KB[:, b])]
        kb = int(np.argmax(ar))
        out["arena"].append(ar[kb])
        out["arena_quality"].append(q_KB[kb, b])
        out["arena_cost"].append(c_KB[kb, b])
        out["q_at_25"].append(mt.quality_at_budget(c_KB[:, b], q_KB[:, b], 0.25 * hi))
        out["q_at_50"].append(mt.quality_at_budget(c_KB[:, b], q_KB[:, b], 0.50 * hi))
        out["q_at_35best"].append(mt.quality_at_budget(c_KB[:, b], q_KB[:, b], 0.35 * mc_MB[best, b]))
    return {k: np.array(v, float) for k, v in out.items()}


def _per_category(sw: Sweep, test: RoutingDataset) -> dict | None:
    """Per-category outcomes at the best operating point within 50% of the most expensive model's
    cost; None when no operating point meets that budget (the table then says n/a, and the chart
    leaves the router out instead of showing another point under that label)."""
    q_K, c_K = sw.quality_KP.mean(1), sw.cost_KP.mean(1)
    ok = np.flatnonzero(c_K <= 0.5 * test.costs_PM.mean(0).max() * (1 + 1e-9))
    if not len(ok):
        return None
    k50 = int(ok[np.argmax(q_K[ok])])
    cat_arr = np.array(test.categories)
    return {c: {"n": int((cat_arr == c).sum()), "quality": float(sw.quality_KP[k50, cat_arr == c].mean()),
                "cost": float(sw.cost_KP[k50, cat_arr == c].mean()),
                "share": {m: float((sw.idx_KP[k50, cat_arr == c] == j).mean()) for j, m in enumerate(test.models)}}
            for c in sorted(set(test.categories))}


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
        boot = {k: boots[k].tolist() for k in PAIRED_KEYS}  # same resamples for every router (same seed)
        for k, v in boots.items():
            v = v[np.isfinite(v)]
            ci[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [None, None]
    q_K, c_K = sw.quality_KP.mean(1), sw.cost_KP.mean(1)
    return {"router": sw.router, "metrics": point, "ci95": ci, "_boot": boot if n_boot > 0 else None,
            "curve": {"mu": sw.mus_K.tolist(), "cost": c_K.tolist(), "quality": q_K.tolist()},
            "per_category_at_50pct_budget": _per_category(sw, test), "fit_s": sw.fit_s, "route_s": sw.route_s}


def validate_plan(ds: RoutingDataset, routers: list[str], router_options: dict | None = None) -> None:
    """Check the whole comparison before anything is fitted: router names, options (only for
    routers in the plan, only known fields), two-model routers against the pool, prompt texts.
    Errors name the CLI flags (``--routers``, ``--option``, ``--models``)."""
    router_options = router_options or {}
    if not routers:
        raise MoelabError("--routers is empty; name at least one router (see `moelab route routers`)")
    for r in routers:
        MODEL_ROUTERS.get(r)  # raises with the valid names
    extra = sorted(set(router_options) - set(routers))
    if extra:
        raise MoelabError(f"--option given for router(s) {extra} that are not in --routers ({','.join(routers)}); "
                          "add them to --routers or drop the option")
    for r in routers:
        cls = MODEL_ROUTERS.get(r)
        cls(**router_options.get(r, {}))  # unknown option names raise here
        if cls.two_model and len(ds.models) != 2:
            raise MoelabError(
                f"router {r!r} routes between two models; the dataset has {len(ds.models)} "
                f"({', '.join(ds.models)}); pick two with --models A,B or leave {r!r} out of --routers")
    if any(MODEL_ROUTERS.get(r).needs_features for r in routers):
        ds.require_texts()


def _paired_vs(results: dict, ref: str) -> None:
    """``vs_<ref>``: router minus reference for PAIRED_KEYS, point and a paired 95% bootstrap CI
    (both routers are evaluated on the same resamples of the test prompts)."""
    rb = results[ref].get("_boot")
    for name, r in results.items():
        out = {}
        for k in PAIRED_KEYS:
            d = {"point": r["metrics"][k] - results[ref]["metrics"][k], "ci95": [None, None]}
            if rb is not None and r.get("_boot") is not None:
                v = np.array(r["_boot"][k]) - np.array(rb[k])
                v = v[np.isfinite(v)]
                if len(v):
                    d["ci95"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            out[k] = d
        r[f"vs_{ref}"] = out


def _split_info(ds, train, test, group_by, log) -> dict:
    info = {}
    if group_by != "prompt":
        key = "sources" if group_by == "source" else "categories"
        g_tr, g_te = sorted(set(getattr(train, key))), sorted(set(getattr(test, key)))
        info = {"train_groups": g_tr, "test_groups": g_te}
        if len(g_tr) + len(g_te) < 10:
            log(f"warning: group_by={group_by!r} has only {len(g_tr) + len(g_te)} groups: the test split is "
                f"{len(g_te)} whole group(s) {g_te}, i.e. leave-{len(g_te)}-{group_by}-out; read the result as such")
    return info


def _stage_bar(total: int, progress: bool | None):
    """A tqdm bar over the comparison's stages (stderr; ``None``: only on a terminal)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="route compare", unit="stage", file=sys.stderr, leave=False,
                disable=None if progress is None else not progress, dynamic_ncols=True)


def _stage(bar, what: str) -> None:
    """Close the previous stage (the first call closes none) and name the one starting."""
    if getattr(bar, "_moelab_started", False):
        bar.update(1)
    bar._moelab_started = True
    bar.set_postfix_str(what)


def compare(ds: RoutingDataset, routers: list[str], test_frac: float = 0.3, group_by: str = "prompt",
            seed: int = 0, n_boot: int = 200, feature_dim: int = 128, router_options: dict | None = None,
            cache_dir: str | Path | None = None, log=print, tune: bool = True, cv_folds: int = 3,
            featurizer=None, reference: str = "knn", progress: bool | None = None) -> dict:
    """Split ``ds``, fit one featurizer on the training texts, tune each router's grid by
    ``cv_folds``-fold cross-validation on the training split (``tune=True``; values given in
    ``router_options`` are kept fixed), fit and sweep every router on the test split, and return a
    JSON-able result (the oracle is always evaluated, for the gap). ``featurizer``: a
    :class:`~moelab.route.features.Featurizer` to use instead of TF-IDF+SVD (e.g. a local
    embedding model); it is fitted on the training texts. ``progress``: a tqdm bar of the stages
    (features, then each router's tuning, fit and sweep) on stderr; None shows it on a terminal only."""
    from moelab.route.tuning import tune_router

    router_options = router_options or {}
    validate_plan(ds, routers, router_options)
    train, test = ds.split(test_frac=test_frac, group_by=group_by, seed=seed)
    split_info = _split_info(ds, train, test, group_by, log)
    t0 = time.perf_counter()
    feat = featurizer if featurizer is not None else TfidfSvdFeaturizer(dim=feature_dim, seed=seed)
    needs = any(MODEL_ROUTERS.get(r).needs_features for r in routers)
    bar = _stage_bar(3 * needs + 1 + len(routers), progress)
    x_tr = x_te = None
    if needs:
        _stage(bar, f"fitting {getattr(feat, 'kind', 'features')} on {train.n_prompts} training prompts")
        if isinstance(feat, TfidfSvdFeaturizer):
            feat.fit_cached(train.require_texts(), cache_dir)
        else:
            feat.fit(train.require_texts())
        _stage(bar, f"features of {train.n_prompts} training prompts")
        x_tr = feat.transform(train.require_texts(), cache_dir)
        _stage(bar, f"features of {test.n_prompts} test prompts")
        x_te = feat.transform(test.require_texts(), cache_dir)
    feat_s = time.perf_counter() - t0
    log(f"{ds.name}: {train.n_prompts} train / {test.n_prompts} test prompts, models {ds.models}; "
        f"features {feat_s:.1f}s")
    _stage(bar, "oracle")
    osw = sweep(build_router("oracle").fit(train), test)
    results = {}
    for name in routers:
        _stage(bar, f"{'tuning, ' if tune else ''}fitting and sweeping {name}")
        opts, tuned = dict(router_options.get(name, {})), None
        if tune:
            tuned = tune_router(name, train, x_tr, fixed=opts, folds=cv_folds, seed=seed, group_by=group_by)
            opts.update(tuned["chosen"])
        r = build_router(name, **opts)
        t0 = time.perf_counter()
        r.fit(train, featurizer=feat if r.needs_features else None, x_ND=x_tr if r.needs_features else None)
        fit_s = time.perf_counter() - t0
        sw = sweep(r, test, x_te if r.needs_features else None)
        sw.fit_s = fit_s
        results[name] = evaluate_sweep(sw, test, osw, n_boot=n_boot, seed=seed)
        results[name]["options"] = {k: v for k, v in vars(r.cfg).items()}
        results[name]["tuning"] = tuned
        m = results[name]["metrics"]
        log(f"  {name:12s} fit {fit_s:6.2f}s  AIQ {m['aiq']:.4f}  gap closed {m['gap_closed']:.3f}  "
            f"Q@35%best {m['q_at_35best']:.4f}" + (f"  tuned {tuned['chosen']}" if tuned and tuned["chosen"] else ""))
    _stage(bar, "done")
    bar.close()
    if reference in results:
        _paired_vs(results, reference)
    for r in results.values():
        r.pop("_boot", None)
    singles = {m: {"quality": float(test.scores_PM[:, j].mean()), "cost": float(test.costs_PM[:, j].mean())}
               for j, m in enumerate(test.models)}
    return {"dataset": ds.name, "reference": reference if reference in results else None, "n_train": train.n_prompts, "n_test": test.n_prompts, "models": test.models,
            "single_models": singles,
            "split": {"test_frac": test_frac, "group_by": group_by, "seed": seed, **split_info},
            "n_boot": n_boot, "feature_s": feat_s, "featurizer": getattr(feat, "kind", "?"),
            "tuning": {"enabled": tune, "folds": cv_folds, "score": "aiq"}, "routers": results}


# ---------------------------------------------------------------------- reporting
def _fmt(v, ci=None, pct=False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    s = f"{100 * v:.1f}" if pct else f"{v:.3f}"
    if ci and ci[0] is not None:
        lo, hi = ci
        s += f" [{100 * lo:.1f}, {100 * hi:.1f}]" if pct else f" [{lo:.3f}, {hi:.3f}]"
    return s


TABLE_COLUMNS = [("AIQ", "aiq", False), ("AIQ own", "aiq_own_points", False), ("gap closed", "gap_closed", False),
                 ("APGR", "apgr", False), ("APGR RouteLLM", "apgr_routellm", False), ("CPT50%", "cpt50", True),
                 ("CPT80%", "cpt80", True), ("Arena", "arena", True), ("Q@35% best", "q_at_35best", True),
                 ("Q@50%", "q_at_50", True)]
TABLE_NOTE = ("AIQ: RouterBench area under the cost-quality hull, single models included (zero router); "
              "AIQ own: the router's own points only; gap closed: (AIQ - zero router) / (oracle - zero router); "
              "APGR: moelab's (flat to 100% strong calls), APGR RouteLLM: over the swept span only; "
              "Q@35% best: best quality at <= 35% of the best single model's cost; Q@50%: at <= 50% of the most "
              "expensive model's cost; quality and Arena in %; 95% bootstrap CIs in brackets.")


def format_table(res: dict) -> str:
    """Markdown table of the comparison (quality and arena in %, 95% bootstrap CIs in brackets)."""
    cols = [c for c in TABLE_COLUMNS if any(np.isfinite(r["metrics"].get(c[1], np.nan))
                                            for r in res["routers"].values())]
    head = "| router | " + " | ".join(c[0] for c in cols) + " | options (CV-tuned*) | fit s |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for name, r in res["routers"].items():
        m, ci = r["metrics"], r["ci95"]
        cells = [_fmt(m.get(k), ci.get(k), pct) for _, k, pct in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_options_cell(r)} | {r['fit_s']:.2f} |")
    singles = ", ".join(f"{m}: q={v['quality']:.3f}, ${v['cost']:.2e}/prompt" for m, v in res["single_models"].items())
    return "\n".join(lines) + f"\n\n{TABLE_NOTE}\n\nsingle models on the test split: {singles}"


def _options_cell(r: dict) -> str:
    tuned = (r.get("tuning") or {}).get("chosen", {})
    return ", ".join(f"{k}={v}*" for k, v in tuned.items()) or "-"


METRIC_DEFINITIONS = [  # (name, one line), shown on the report page
    ("AIQ", "RouterBench's average improvement in quality: the area under the router's cost-quality hull "
            "(single models' points included: the zero router) over the single models' cost range, divided by "
            "that range; higher is better."),
    ("AIQ own", "the same area from the router's own operating points only (zero below its cheapest point)."),
    ("gap closed", "(AIQ - zero router's AIQ) / (oracle's AIQ - zero router's AIQ): the share of the way from "
                   "mixing single models to perfect per-prompt routing."),
    ("APGR", "RouteLLM's average performance gap recovered, two-model pools only: the mean over 0-100% strong-model "
             "calls of (quality - weak) / (strong - weak); 'APGR RouteLLM' averages over the swept span only."),
    ("CPT", "RouteLLM's call-performance threshold: the smallest share of strong-model calls that recovers 50% "
            "(CPT50%) or 80% (CPT80%) of the weak-to-strong gap; lower is better."),
    ("arena score", "RouterArena's score at the router's best operating point: (1 + 0.1)·A·C / (0.1·A + C) for "
                    "accuracy A and a log-scaled cost score C (1 at $0.0044, 0 at $200 per 1000 queries), in %."),
    ("Q@budget", "the best mean quality among operating points whose mean cost is within the budget: Q@35% best = "
                 "35% of the best single model's cost, Q@50% = 50% of the most expensive model's cost, in %."),
]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def series_styles(n: int) -> list[dict]:
    """Distinct (colour, line style, marker) for n series: tab20's 20 colours, its ten dark shades
    first and then the ten light ones (so the first ten series differ in hue, not only in shade),
    then new line styles and markers, so no two series look alike (tab10 repeated colours after 10)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    ls, mk = ["-", "--", ":", "-."], [".", "x", "+", "^"]
    return [{"color": cmap(2 * (i % 10) + (i // 10) % 2), "ls": ls[(i // 20) % 4], "marker": mk[(i // 20) % 4]}
            for i in range(n)]


SINGLE_MARKERS = ["*", "P", "X", "D", "s", "p", "h", "v", "^", "<", ">", "8"]


def curves_figure(res, plt):
    """Cost-quality curves; single models are black markers named in the legend (full names, no
    annotation on the plot that could cover a curve)."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    names = list(res["routers"])
    for st, name in zip(series_styles(len(names)), names):
        r = res["routers"][name]
        c, q = np.array(r["curve"]["cost"]), np.array(r["curve"]["quality"])
        o = np.argsort(c)
        ax.plot(c[o], q[o], ms=3, lw=1, label=name, **st)
    for i, (m, v) in enumerate(res["single_models"].items()):
        ax.scatter([v["cost"]], [v["quality"]], marker=SINGLE_MARKERS[i % len(SINGLE_MARKERS)], s=80, zorder=5,
                   color="black", edgecolor="white", linewidth=0.5, label=f"{m} (single model)")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per prompt (USD, log scale)")
    ax.set_ylabel("mean quality")
    ax.set_title(f"{res['dataset']}: cost–quality curves (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside the axes
    return fig


def bars_figure(res, plt):
    """Per-category quality at the 50% budget as horizontal bars: category names on the y axis in
    full (no truncation), one bar per router, most frequent category on top."""
    have = {n: r["per_category_at_50pct_budget"] for n, r in res["routers"].items()
            if r.get("per_category_at_50pct_budget")}
    missing = [n for n, r in res["routers"].items() if not r.get("per_category_at_50pct_budget")]
    cats = []
    if have:
        first = next(iter(have.values()))
        cats = [c for c, _ in sorted(first.items(), key=lambda kv: -kv[1]["n"])[:20]]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.2 * len(cats) * max(1, len(have)) ** 0.5 + 1.5)))
    if have:
        hbar = 0.8 / len(have)
        y = np.arange(len(cats))[::-1]
        for i, (st, (name, pc)) in enumerate(zip(series_styles(len(have)), have.items())):
            ax.barh(y + 0.4 - (i + 0.5) * hbar, [pc[c]["quality"] for c in cats], hbar, label=name,
                    color=st["color"])
        ax.set_yticks(y)
        ax.set_yticklabels([f"{c} (n={first[c]['n']})" for c in cats], fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_xlabel("mean quality at 50% of the most expensive model's cost")
    note = f"\nnot shown (cannot meet the 50% budget): {', '.join(missing)}" if missing else ""
    ax.set_title("Per-category quality" + note, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return fig


def _fig_png(fig, plt) -> str:
    out = _png(fig)
    plt.close(fig)
    return out


def _table_rows(res: dict) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in TABLE_COLUMNS if any(np.isfinite(r["metrics"].get(c[1], np.nan))
                                            for r in res["routers"].values())]
    header = ["router", *[c[0] for c in cols], "options (CV-tuned*)", "fit s"]
    rows = [[name, *[_fmt(r["metrics"].get(k), r["ci95"].get(k), pct) for _, k, pct in cols], _options_cell(r),
             f"{r['fit_s']:.2f}"] for name, r in res["routers"].items()]
    return header, rows


def _lead(res: dict) -> str:
    """The answer first: the router with the highest AIQ, with its interval and gap closed."""
    best = max(res["routers"], key=lambda n: np.nan_to_num(res["routers"][n]["metrics"]["aiq"], nan=-np.inf))
    m, ci = res["routers"][best]["metrics"], res["routers"][best]["ci95"]
    return (f"<p class='lead'>Highest AIQ: <b>{html.escape(best)}</b> {_fmt(m['aiq'], ci.get('aiq'))}, closing "
            f"{_fmt(m['gap_closed'], ci.get('gap_closed'))} of the gap from mixing single models to the oracle.</p>"
            f"<p class='note'>{res['n_train']} train / {res['n_test']} test prompts, split by "
            f"{html.escape(str(res['split']['group_by']))}; models: {html.escape(', '.join(res['models']))}; "
            f"95% bootstrap CIs over test prompts ({res['n_boot']} resamples) in brackets.</p>")


def _paired_table(res: dict) -> str:
    ref = res.get("reference")
    if not ref:
        return ""
    from moelab.htmlpage import table

    rows = [[n, *[_fmt(r[f"vs_{ref}"][k]["point"], r[f"vs_{ref}"][k]["ci95"], pct) for k, pct in
                  (("aiq", False), ("gap_closed", False), ("q_at_35best", True))]]
            for n, r in res["routers"].items() if n != ref and f"vs_{ref}" in r]
    return (f"<h2>Paired against {html.escape(ref)}</h2><p class='note'>router minus {html.escape(ref)} on the same "
            "bootstrap resamples; an interval that excludes 0 is a difference.</p>"
            + table(["router", "Δ AIQ", "Δ gap closed", "Δ Q@35% best"], rows)) if rows else ""


def report_html(res: dict, curves_png: str, bars_png: str) -> str:
    """The page: the answer, the metric definitions, the table (a real table that scrolls in its
    own box), paired differences, single models, then the figures with what to look for."""
    from moelab.htmlpage import page, table

    head, rows = _table_rows(res)
    defs = "".join(f"<dt>{html.escape(n)}</dt><dd>{html.escape(d)}</dd>" for n, d in METRIC_DEFINITIONS)
    singles = table(["model", "mean quality", "mean cost per prompt (USD)"],
                    [[m, f"{v['quality']:.3f}", f"{v['cost']:.3g}"] for m, v in res["single_models"].items()])
    fig = lambda b64, alt, cap: (f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(alt)}'>"  # noqa: E731
                                 f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    body = (f"<h1>moelab route compare: {html.escape(res['dataset'])}</h1>{_lead(res)}"
            f"<section id='table'><h2>Routers</h2>{table(head, rows)}<p class='note'>* options chosen by "
            f"cross-validation on the training split; quality, CPT, arena and Q@budget in %.</p></section>"
            f"<section id='metrics'><h2>What the metrics mean</h2><dl class='defs'>{defs}</dl></section>"
            f"<section id='paired'>{_paired_table(res)}</section>"
            f"<section id='singles'><h2>Single models on the test split</h2>{singles}</section>"
            "<section id='plots'><h2>Plots</h2>"
            + fig(curves_png, "cost-quality curves",
                  "Up and to the left is better. A router is worth using where its curve lies above the line joining "
                  "the single models (black markers), which any random mix of them reaches; a curve that bends "
                  "up early buys most of the quality for little cost.")
            + fig(bars_png, "per-category quality",
                  "Categories where one router's bar is much longer than the others' are where its prompt features "
                  "help; a category where every router is low is hard for every model at this budget.")
            + "</section>")
    return page(f"moelab route compare: {res['dataset']}", body)


def write_report(res: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` and ``report.html`` (curves and per-category bars, PNG base64)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    doc = report_html(res, _fig_png(curves_figure(res, plt), plt), _fig_png(bars_figure(res, plt), plt))
    (out / "report.html").write_text(doc)
    return {"json": out / "results.json", "html": out / "report.html"}

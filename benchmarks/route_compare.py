"""Router comparison on the shared recorded outcomes: how much of the zero-router → oracle AIQ gap
each router closes (95% bootstrap CIs), paired against CV-tuned kNN, and quality at 35% of the best
single model's cost.

Run: ``python benchmarks/route_compare.py`` (about 10 minutes on the shared 2-core machine;
``--quick``: 1,500 prompts per dataset, 50 resamples, a smoke test). Needs $MOELAB_SHARED.
Writes benchmarks/results/route_compare.{md,json}.

Every router's CV grid is tuned by 3-fold cross-validation on the training split (moelab.route.tuning);
the chosen values are in the table. Split: 30% of prompts by hash (seed 0); TF-IDF+SVD-128 features
fitted on the training split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROUTERS = ["random", "best-single", "cheapest", "knn", "linear", "mlp", "mf", "carrot", "routerdc", "category",
           "universal", "bandit", "threshold", "cascade", "sw-ranking", "irt"]
DATASETS = ["routellm-mmlu", "routellm-gsm8k", "routerarena"]


def _ci(v, ci, pct=False):
    if v is None or v != v:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
    return f(v) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci and ci[0] is not None else "")


def table(res: dict) -> str:
    ref = res.get("reference") or "knn"
    head = (f"| router | AIQ | AIQ own points | gap closed | gap closed − tuned {ref} (paired) | Q@35% of best cost | "
            "APGR | APGR RouteLLM | CV-tuned | fit s |")
    lines = [head, "|" + "---|" * 10]
    for name, r in res["routers"].items():
        m, c = r["metrics"], r["ci95"]
        d = (r.get(f"vs_{ref}") or {}).get("gap_closed", {})
        tuned = ", ".join(f"{k}={v}" for k, v in ((r.get("tuning") or {}).get("chosen") or {}).items()) or "-"
        lines.append(f"| {name} | {_ci(m['aiq'], c.get('aiq'))} | {_ci(m['aiq_own_points'], c.get('aiq_own_points'))} | "
                     f"{_ci(m['gap_closed'], c.get('gap_closed'))} | {_ci(d.get('point'), d.get('ci95'))} | "
                     f"{_ci(m['q_at_35best'], c.get('q_at_35best'), True)} | {_ci(m['apgr'], c.get('apgr'))} | "
                     f"{_ci(m['apgr_routellm'], c.get('apgr_routellm'))} | {tuned} | {r['fit_s']:.2f} |")
    singles = ", ".join(f"{m}: q={v['quality']:.3f}, ${v['cost']:.2e}/prompt" for m, v in res["single_models"].items())
    z = next(iter(res["routers"].values()))["metrics"]
    return ("\n".join(lines) + f"\n\nZero router (single-model hull) AIQ {z['aiq_zero_router']:.3f}, oracle AIQ "
            f"{z['aiq_oracle']:.3f}. Single models on the test split: {singles}.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--max-prompts", type=int, help="deterministic subset of datasets larger than this")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "route_compare"))
    args = ap.parse_args()
    from moelab.route import compare, load_dataset

    t_all = time.perf_counter()
    parts, results = [], {}
    for name in args.datasets.split(","):
        ds = load_dataset(name, max_prompts=1500 if args.quick else args.max_prompts)
        t0 = time.perf_counter()
        res = compare(ds, args.routers.split(","), n_boot=50 if args.quick else 200, cache_dir=None,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
        res["wall_s"] = time.perf_counter() - t0
        results[name] = res
        parts.append(f"## {name} ({res['n_train']} train / {res['n_test']} test prompts; {res['wall_s']:.0f} s)\n\n"
                     + table(res))
    wall = time.perf_counter() - t_all
    head = (f"# Model-level routing: router comparison{' (QUICK smoke run)' if args.quick else ''}\n\n"
            f"Command: `python benchmarks/route_compare.py{' --quick' if args.quick else ''}"
            f"{f' --max-prompts {args.max_prompts}' if args.max_prompts else ''}`; "
            f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} at the end "
            f"(shared machine, under load), {time.strftime('%Y-%m-%d %H:%M')}, total {wall:.0f} s.\n\n"
            "Columns: AIQ = RouterBench's area under the cost–quality hull with the single models included "
            "(the zero router); AIQ own points = the router's points only; gap closed = (AIQ − zero router) / "
            "(oracle − zero router), the share of the single-model-mix → oracle gap the router closes; the paired "
            "column is the router's gap closed minus CV-tuned kNN's on the same bootstrap resamples; Q@35% = best "
            "quality (%) at a mean cost within 35% of the best single model's cost (n/a if no operating point is "
            "that cheap); APGR = moelab's (flat to 100% strong calls), APGR RouteLLM = RouteLLM's (swept span "
            "only); n/a when the expensive model is not the better one. 95% percentile-bootstrap CIs over test "
            "prompts in brackets. Hyperparameters: each router's grid tuned by 3-fold CV on the training split.\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".md")).write_text(head + "\n" + "\n\n".join(parts) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(head + "\n" + "\n\n".join(parts))


if __name__ == "__main__":
    main()

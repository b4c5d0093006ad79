"""Model-level routing benchmark: fit time on RouteLLM MMLU and routing latency per prompt.

Run: ``python benchmarks/route.py`` (``--quick`` for a 2,000-prompt smoke test). Needs the shared
RouteLLM files ($MOELAB_SHARED or ../shared). Writes benchmarks/results/route.{json,md}.

- ``fit_s``: one fit of the router on all 13,932 MMLU prompts (after dedup and contamination
  removal) from precomputed TF-IDF+SVD features (the featurizer's own fit is reported once, as
  ``featurizer``).
- Latency: median over interleaved rounds (benchmarks/common.py) of routing a batch of 1 and of
  1,000 held-in prompts at trade-off 0.5, divided by the batch size. ``features`` = from
  precomputed features (``x_PD``); ``text`` = end to end from prompt text, including the TF-IDF
  transform (the feature cache is bypassed).
- Threads: the target is a 2-core machine. Fitting and routing run under ``threads.n`` BLAS/torch
  threads (moelab.route.features.threads; default 1: on the shared 2-core machine 2 BLAS threads
  thrashed, e.g. a one-prompt kNN similarity took 40-65 ms with 2 threads vs 0.7 ms with 1).
  ``--threads 2`` to compare.

Targets (issue): kNN, linear, MF and CARROT route in < 1 ms per prompt batched and fit in < 60 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, machine_info, markdown_table, median, time_interleaved, write_results  # noqa: E402

from moelab.route import build_router, load_routellm_mmlu  # noqa: E402
from moelab.route.features import TfidfSvdFeaturizer, threads  # noqa: E402

ROUTERS = ["random", "best-single", "cheapest", "knn", "linear", "mlp", "mf", "carrot", "routerdc",
           "category", "universal", "bandit", "threshold", "cascade"]
TARGETED = {"knn", "linear", "mf", "carrot"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--routers", default=",".join(ROUTERS))
    args = ap.parse_args()
    threads.n = args.threads
    ds = load_routellm_mmlu()
    if args.quick:
        ds = ds.subset(np.arange(2000))
    texts = ds.require_texts()
    t0 = time.perf_counter()
    feat = TfidfSvdFeaturizer(dim=128).fit(texts)
    feat_fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_ND = feat._transform(texts).astype(np.float32)
    feat_tx_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    b1000 = rng.choice(len(texts), 1000, replace=False)
    t1000 = [texts[i] for i in b1000]
    rows, payload = [], {"machine": machine_info(), "n_prompts": ds.n_prompts, "threads": args.threads,
                         "featurizer": {"fit_s": feat_fit_s, "transform_all_s": feat_tx_s,
                                        "transform_ms_per_prompt": 1e3 * feat_tx_s / ds.n_prompts},
                         "routers": {}}
    print(f"{ds.n_prompts} prompts; featurizer fit {feat_fit_s:.1f}s, transform {feat_tx_s:.1f}s", flush=True)
    for name in args.routers.split(","):
        r = build_router(name)
        t0 = time.perf_counter()
        r.fit(ds, featurizer=feat, x_ND=x_ND)
        fit_s = time.perf_counter() - t0
        x1, x1000 = x_ND[b1000[:1]], x_ND[b1000]
        cases = [
            Case("feat-1", lambda: r.route(None if r.needs_features else [t1000[0]], x_PD=x1 if r.needs_features else None)),
            Case("feat-1000", lambda: r.route(None if r.needs_features else t1000, x_PD=x1000 if r.needs_features else None)),
            Case("text-1", lambda: r.route(None if r.needs_features else [t1000[0]],
                                           x_PD=feat._transform(t1000[:1]).astype(np.float32) if r.needs_features else None)),
            Case("text-1000", lambda: r.route(None if r.needs_features else t1000,
                                              x_PD=feat._transform(t1000).astype(np.float32) if r.needs_features else None)),
        ]
        times = time_interleaved(cases, rounds=args.rounds, warmup=1)
        res = {"fit_s": fit_s}
        for c in cases:
            kind, b = c.name.split("-")
            res[f"{kind}_ms_per_prompt_b{b}"] = median(times[c.name]) / int(b)
        payload["routers"][name] = res
        ok = ""
        if name in TARGETED:
            ok = "yes" if res["feat_ms_per_prompt_b1000"] < 1.0 and fit_s < 60 else "NO"
        rows.append({"router": name, "fit s": fit_s, "ms/prompt b=1 (feat)": res["feat_ms_per_prompt_b1"],
                     "ms/prompt b=1000 (feat)": res["feat_ms_per_prompt_b1000"],
                     "ms/prompt b=1 (text)": res["text_ms_per_prompt_b1"],
                     "ms/prompt b=1000 (text)": res["text_ms_per_prompt_b1000"], "meets target": ok})
        print(rows[-1], flush=True)
    cols = ["router", "fit s", "ms/prompt b=1 (feat)", "ms/prompt b=1000 (feat)", "ms/prompt b=1 (text)",
            "ms/prompt b=1000 (text)", "meets target"]
    m = payload["machine"]
    md = (f"# Model-level routing benchmark (RouteLLM MMLU, {ds.n_prompts} prompts)\n\n"
          f"Machine: {m['processor']}, {m['cpu_count']} CPUs visible, {args.threads} threads, "
          f"load avg {m['load_avg_1m']:.1f} at start, torch {m['torch']}, {m['time']}.\n"
          f"Featurizer (TF-IDF word+char, SVD 128): fit {feat_fit_s:.1f} s, transform "
          f"{1e3 * feat_tx_s / ds.n_prompts:.3f} ms/prompt.\n"
          "Target: kNN, linear, MF, CARROT < 1 ms/prompt batched (features) and fit < 60 s.\n\n"
          + markdown_table(rows, cols))
    if not args.quick:
        write_results("route", payload, md)
    print(md)


if __name__ == "__main__":
    main()

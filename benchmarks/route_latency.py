"""Routing latency from raw text at batch 1 (the serving path) and ``moelab route predict`` wall time.

Run: ``python benchmarks/route_latency.py`` (``--quick``: fit on 1,500 prompts, 100 queries).
Needs the shared RouteLLM MMLU files ($MOELAB_SHARED). Writes benchmarks/results/route_latency.{json,md}.

Each router is fitted on RouteLLM MMLU training prompts, saved, and loaded back with
``load_router`` (what ``route predict`` and ``route serve`` do); then every held-out prompt is
routed alone (``route([text])``, trade-off 0.5), distinct prompts so no feature cache helps.
Reported: median and p99 ms per query. ``predict`` = wall time of one
``python -m moelab.cli.main route predict DIR --prompt ...`` process (start-up included).
Target (issue 20): < 1 ms per query for knn, mf, carrot, linear; predict < 2 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROUTERS = ["knn", "linear", "mf", "carrot"]


def _pct(v, q):
    return float(np.percentile(np.asarray(v) * 1e3, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "route_latency"))
    args = ap.parse_args()
    from moelab.route import build_router, load_router, load_routellm_mmlu
    from moelab.route.features import TfidfSvdFeaturizer

    ds = load_routellm_mmlu()
    n_fit, n_q = (1500, 100) if args.quick else (9000, 1000)
    train, test = ds.subset(np.arange(n_fit)), ds.subset(np.arange(n_fit, n_fit + n_q))
    feat = TfidfSvdFeaturizer(dim=128).fit(train.require_texts())
    x = feat.transform(train.require_texts())
    rows, tmp = {}, Path(tempfile.mkdtemp())
    for name in args.routers.split(","):
        opts = {"epochs": 5} if name == "mf" else {}
        build_router(name, **opts).fit(train, featurizer=feat, x_ND=x).save(tmp / name)
        r = load_router(tmp / name)
        r.route([test.texts[0]], tradeoff=0.5)  # warm-up
        ts = []
        for t in test.texts:
            t0 = time.perf_counter()
            r.route([t], tradeoff=0.5)
            ts.append(time.perf_counter() - t0)
        rows[name] = {"p50_ms": _pct(ts, 50), "p99_ms": _pct(ts, 99), "mean_ms": float(np.mean(ts) * 1e3)}
        print(f"{name:8s} batch-1 from text: p50 {rows[name]['p50_ms']:.3f} ms  p99 {rows[name]['p99_ms']:.3f} ms")
    walls = []
    env = dict(os.environ)
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moelab.cli.main", "route", "predict", str(tmp / "knn"),
                        "--prompt", "What is the derivative of x^2?"], check=True, capture_output=True, env=env)
        walls.append(time.perf_counter() - t0)
    res = {"routers": rows, "predict_wall_s": float(np.median(walls)), "n_fit": n_fit, "n_queries": n_q,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"route predict wall time: {res['predict_wall_s']:.2f} s (median of 3)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    lines = [f"# Routing latency from raw text, batch 1 ({res['machine']}, {res['when']})", "",
             "| router | p50 ms | p99 ms | mean ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['mean_ms']:.3f} |" for k, v in rows.items()]
    lines += ["", f"`moelab route predict` wall time: {res['predict_wall_s']:.2f} s (median of 3 processes)."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

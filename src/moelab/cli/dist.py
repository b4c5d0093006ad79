"""`moelab ep-plan` (expert placement and all-to-all traffic from a routing trace) and
`moelab offload-sim` (expert-cache simulation over a trace); the `train --nproc` launcher."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def cmd_ep_plan(args: argparse.Namespace) -> int:
    from moelab.dist.plan import DEFAULT_RANKS, ep_plan, format_table, plot

    ranks = args.ranks or list(DEFAULT_RANKS)
    methods = ["plain", args.method] if args.method != "plain" else ["plain"]
    rows = ep_plan(args.trace, ranks, args.redundant, methods, args.dtype, args.groups, args.nodes)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    if args.plot:
        print(f"wrote {plot(rows, args.plot)}")
    return 0


def cmd_offload_sim(args: argparse.Namespace) -> int:
    from moelab.analysis.trace import Trace
    from moelab.dist.offload import segment_metrics, simulate
    from moelab.dist.plan import find_trace

    trace = Trace.load(find_trace(args.trace))
    out = {}
    for policy in args.policy:
        res = simulate(trace, args.cache_experts, policy=policy, predict=args.predict, expert_bytes=args.expert_bytes)
        out[policy] = res.to_dict()
    out["segment"] = segment_metrics(trace, args.cache_experts)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"cache {args.cache_experts} experts, predict={args.predict}, {out[args.policy[0]]['tokens']} tokens replayed")
    unit = "experts moved/token" if args.expert_bytes == 1 else "bytes moved/token"
    for policy in args.policy:
        r = out[policy]
        pp = "" if r["prefetch_precision"] is None else f"  prefetch precision {r['prefetch_precision']:.3f}"
        print(f"{policy:>4}: hit rate {r['hit_rate']:.3f}  {unit} {r['bytes_per_token']:.2f}{pp}")
    s = out["segment"]
    print(f"trace: consecutive-token overlap {s['consecutive_overlap']:.3f}, SCH (Belady bound) {s['sch']:.3f}")
    return 0


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run ``moelab train`` (``argv`` without --nproc) under torchrun with ``nproc`` processes."""
    from moelab.dist.launch import torchrun_command

    cmd = torchrun_command(nproc, argv)
    print("moelab: " + " ".join(cmd[2:]), file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ep-plan", help="expert placement (plain EP / EPLB / LLEP): rank load imbalance and "
                                      "all-to-all bytes per token from a routing trace")
    p.add_argument("trace", metavar="RUN_OR_TRACE", help="a trace file or a run with analysis/trace_step_*")
    p.add_argument("--ranks", type=int, nargs="*", help="rank counts (default: 8 16 ... 1024)")
    p.add_argument("--redundant", type=int, default=0, help="EPLB redundant expert slots (default 0)")
    p.add_argument("--method", choices=["plain", "eplb", "llep"], default="eplb", help="compared with plain EP")
    p.add_argument("--groups", type=int, default=1, help="EPLB expert groups (default 1: global policy)")
    p.add_argument("--nodes", type=int, default=1, help="EPLB nodes (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp8"], default="bfloat16",
                   help="activation dtype on the wire (default bfloat16)")
    p.add_argument("--plot", metavar="PNG", help="also write a plot")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.set_defaults(func=cmd_ep_plan)
    p = sub.add_parser("offload-sim", help="expert-cache (LRU/LFU) simulation with routing-path prefetching")
    p.add_argument("trace", metavar="RUN_OR_TRACE", help="a trace file or a run with analysis/trace_step_*")
    p.add_argument("--cache-experts", type=int, default=16, help="(layer, expert) entries on the device")
    p.add_argument("--policy", nargs="+", choices=["lru", "lfu"], default=["lru", "lfu"], help="eviction policies")
    p.add_argument("--predict", choices=["none", "expertflow", "pregate"], default="none", help="prefetch predictor")
    p.add_argument("--expert-bytes", type=int, default=1, help="bytes of one expert (default 1: counts experts)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_offload_sim)


def wants_distributed(cfg, run_dir, resume: bool) -> bool:
    """Under torchrun, with ``parallel.dp/ep`` set, or resuming a distributed checkpoint."""
    from pathlib import Path

    from moelab.dist.checkpoint import list_dist_checkpoints

    return ("WORLD_SIZE" in os.environ or cfg.parallel.active()
            or (resume and bool(list_dist_checkpoints(Path(run_dir)))))


def train_distributed_cli(cfg, run_dir, args: argparse.Namespace) -> int:
    from moelab.cli.train import format_summary
    from moelab.dist.groups import shutdown
    from moelab.dist.trainer import train_distributed

    try:
        summary = train_distributed(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary, cfg, run_dir))
    return 0

"""`moelab analyze RUN`, `moelab report RUN`, `moelab compare RUN...` (routing analytics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (as written by `moelab train`)")
    p.add_argument("--steps", type=int, nargs="*", default=None,
                   help="checkpoint steps to trace (default: up to --max-traces spread over training, last included)")
    p.add_argument("--max-traces", type=int, default=3, help="checkpoints to trace when --steps is not given")
    p.add_argument("--windows", type=int, default=16, help="validation windows in the seeded trace sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace sample")
    p.add_argument("--no-trace", action="store_true", help="only use metrics.jsonl (no model forward)")


def _kw(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "max_traces": args.max_traces, "num_windows": args.windows, "seed": args.seed,
            "trace": not args.no_trace}


def cmd_analyze(args: argparse.Namespace) -> int:
    from moelab.analysis.analyses import analyze_run
    from moelab.errors import MoelabError

    ra = analyze_run(args.run_dir, **_kw(args))
    print(json.dumps(ra.summary(), indent=1))
    print(f"wrote {Path(args.run_dir) / 'analysis'}")
    if ra.trace_error:  # the metrics part was written, but the routing traces asked for are missing
        raise MoelabError(f"tracing {args.run_dir!r} failed: {ra.trace_error} (use --no-trace for the metrics only)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from moelab.analysis.report import write_report

    page = write_report(args.run_dir, args.out, **_kw(args))
    print(f"wrote {page}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from moelab.analysis.compare import write_comparison

    page, md = write_comparison(args.run_dirs, args.out)
    print(md)
    print(f"\nwrote {page}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="routing analyses of a run (traces checkpoints, writes RUN/analysis/)")
    _trace_args(p)
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("report", help="self-contained HTML routing report of a run (+ PNGs)")
    _trace_args(p)
    p.add_argument("--out", default=None, help="output folder (default RUN/report)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="several runs side by side (markdown table + HTML with overlaid curves)")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare", help="output folder (default ./compare)")
    p.set_defaults(func=cmd_compare)

"""`moelab analyze RUN`, `moelab report RUN`, `moelab compare RUN...` (routing analytics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (as written by `moelab train`)")
    p.add_argument("--steps", type=int, nargs="*", default=None,
                   help="checkpoint steps to trace (default: up to --max-traces spread over training, last included)")
    p.add_argument("--max-traces", type=int, default=3, help="checkpoints to trace when --steps is not given (default: 3)")
    p.add_argument("--windows", type=int, default=16, help="validation windows in the seeded trace sample (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace sample (default: 0)")
    p.add_argument("--no-trace", action="store_true", help="only use metrics.jsonl (no model forward; default: trace)")


def _kw(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "max_traces": args.max_traces, "num_windows": args.windows, "seed": args.seed,
            "trace": not args.no_trace, "progress": True}


_COLUMNS = [("layer", "layer", "d"), ("max/mean", "max_over_mean", ".3f"), ("CV", "cv", ".3f"),
            ("unused", "unused", "d"), ("special.", "specialisation", ".3f"), ("changed", "changed_frac", ".3f"),
            ("consec.", "consecutive_overlap", ".3f"), ("SRP", "srp", ".3f"), ("SCH", "sch", ".3f")]
_LEGEND = ("max/mean, CV: expert load balance (1, 0 = perfect); unused: experts with no token; special.: "
           "I(expert; domain)/H(domain); changed: share of tokens whose expert set changed since the previous "
           "traced checkpoint; consec.: Jaccard of consecutive tokens' expert sets; SRP/SCH: local routing "
           "consistency (Liang et al. 2025)")


def format_analysis(summary: dict) -> str:
    """``moelab analyze``'s table: one row per MoE layer at the last traced checkpoint."""
    steps = summary.get("traced_steps") or []
    if not steps:
        why = summary.get("trace_error") or "no checkpoint was traced (--no-trace)"
        return f"{summary.get('run_dir')}: no routing traces ({why}); see metrics.jsonl for balance over training"
    last = summary["analyses"][str(steps[-1])]
    changed = {}
    if summary.get("stability"):
        changed = {r["layer"]: r["changed_frac"] for r in summary["stability"][-1]["layers"]}
    rows = [[_cell({**x, "changed_frac": changed.get(x["layer"])}.get(key), fmt) for _, key, fmt in _COLUMNS]
            for x in last["layers"]]
    head = (f"{summary.get('run_dir')}: routing at step {steps[-1]} ({last['num_tokens']:,} traced tokens; "
            f"checkpoints traced: {', '.join(map(str, steps))})")
    from moelab.cli.train import _table

    return "\n".join([head, _table([c for c, _, _ in _COLUMNS], rows), _LEGEND])


def _cell(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def cmd_analyze(args: argparse.Namespace) -> int:
    from moelab.analysis.analyses import analyze_run
    from moelab.errors import MoelabError

    ra = analyze_run(args.run_dir, **_kw(args))
    print(json.dumps(ra.summary(), indent=1) if args.json else format_analysis(ra.summary()))
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
    p = sub.add_parser("analyze", help="routing analyses of a run (traces checkpoints, writes RUN/analysis/)",
                       description="Trace a run's checkpoints on a seeded validation sample and print, per MoE "
                                   "layer, balance, specialisation, stability and consistency; everything "
                                   "goes to RUN/analysis/analysis.json.")
    _trace_args(p)
    p.add_argument("--json", action="store_true", help="print the full analysis as JSON (default: a table)")
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("report", help="self-contained HTML routing report of a run (+ PNGs)",
                       description="Write RUN/report/report.html: a summary first (val perplexity, balance, "
                                   "tokens/s, parameters, config differences), then the routing plots; it "
                                   "opens offline (images embedded, no scripts).")
    _trace_args(p)
    p.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="several runs side by side (markdown table + HTML with overlaid curves)",
                       description="Compare runs: one table (val loss/ppl overall and per domain, balance, "
                                   "parameters, tokens/s), runs labelled by what differs in their configs, a "
                                   "warning when their tokens, steps or data differ, and overlaid curves.")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    p.set_defaults(func=cmd_compare)

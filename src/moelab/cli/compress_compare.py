"""`moelab compress-compare RUN --methods reap,hc-smoe,modes --keep 0.75,0.5,0.25`: one table, every method."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_compress_compare(args: argparse.Namespace) -> int:
    from moelab.cli._ops_args import calibration_config
    from moelab.errors import MoelabError
    from moelab.ops.compare import compress_compare, markdown_table

    try:
        keeps = [float(k) for k in args.keep.split(",") if k.strip()]
    except ValueError:
        raise MoelabError(f"--keep={args.keep!r} must be comma-separated fractions in (0, 1], e.g. 0.75,0.5") from None
    methods = [m for m in args.methods.split(",") if m.strip()]
    out = Path(args.out) if args.out else Path(args.run_dir) / "compress"
    eb = None if args.eval_batches <= 0 else args.eval_batches
    result = compress_compare(args.run_dir, methods, keeps, out, ccfg=calibration_config(args), eval_batches=eb,
                              eval_batch_size=args.eval_batch_size, progress=not args.no_progress)
    print(markdown_table(result))
    print(f"wrote {out}/compare.md, compare.html, compare.json")
    return 0


# the same list as moelab.ops.compare.DEFAULT_METHODS (tests/ops/test_cli_light.py checks it): kept here so
# that `--help` imports no torch
DEFAULT_METHODS = "frequency,soft_count,ean,reap,easy_ep,tcess,m_smoe,mc_smoe,hc_smoe,sub_moe,dern,threshold,modes"


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli._ops_args import add_calibration_args

    p = sub.add_parser("compress-compare", help="prune / merge / skip methods x budgets vs the unmodified model",
                       description="Apply every method at every budget to the run (in memory; the run is not "
                                   "modified), evaluate validation perplexity overall and per domain, count "
                                   "parameters and active parameters; write a markdown table and an HTML report.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods (default {DEFAULT_METHODS})")
    p.add_argument("--keep", default="0.75,0.5,0.25",
                   help="comma-separated budgets: fraction of experts kept (skipping: of expert computations kept)")
    p.add_argument("--out", default=None, help="output folder (default RUN/compress)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per domain (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="validation batch size")
    add_calibration_args(p)
    p.set_defaults(func=cmd_compress_compare)

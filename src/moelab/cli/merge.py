"""`moelab merge RUN --method hc-smoe --keep 0.5 --out RUN2`: merge experts of a trained run."""

from __future__ import annotations

import argparse
import json


def cmd_merge(args: argparse.Namespace) -> int:
    from moelab.cli._ops_args import calibration_config, parse_keep, report
    from moelab.errors import MoelabError
    from moelab.ops.runner import run_op

    try:
        options = json.loads(args.options) if args.options else None
    except ValueError as e:
        raise MoelabError(f"--options={args.options!r} is not valid JSON ({e})") from None
    m = run_op(args.run_dir, args.out, "merge", args.method, parse_keep(args.keep), calibration_config(args),
               extra={"options": options}, overwrite=args.overwrite, step=args.step, calib_file=args.calib_file)
    report(m, args.out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli._ops_args import add_calibration_args, add_io_args
    from moelab.ops.merge import MERGE_METHODS

    meth = "\n".join(f"  {e.name:<9} {e.description} ({e.paper})" for e in MERGE_METHODS.entries())
    p = sub.add_parser("merge", help="merge experts of a trained run (hc_smoe, m_smoe, mc_smoe, sub_moe, dern)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Merge each layer's experts into fewer; the original router routes every member "
                                   "of a group to its merged expert. The result is an ordinary run directory.",
                       epilog="methods:\n" + meth)
    add_io_args(p)
    p.add_argument("--method", default="hc_smoe", help="merging method (see below; '-' or '_')")
    p.add_argument("--keep", default="0.5", help="merged experts per layer: a fraction in (0, 1] or a count")
    p.add_argument("--options", default=None, help='method options as JSON, e.g. \'{"rank": 16}\' (sub_moe)')
    add_calibration_args(p)
    p.set_defaults(func=cmd_merge)

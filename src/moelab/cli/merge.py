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


# (name, description, paper) of moelab.ops.merge.MERGE_METHODS, static so that `--help` imports no torch
# (tests/ops/test_cli_light.py checks it against the registry)
LISTING = [('dern',
            'drop experts by gate mass, recombine their neurons into the retained experts',
            'Zhou et al. 2025 (DERN)'),
           ('hc_smoe', 'hierarchical clustering of expert outputs, average merge', 'Chen et al. 2025 (HC-SMoE)'),
           ('m_smoe',
            'dominant experts by frequency, router-logit grouping, permutation alignment, frequency-weighted merge',
            'Li et al. 2024 (MC-SMoE)'),
           ('mc_smoe',
            'M-SMoE merge, then low-rank + sparse compression of each merged expert',
            'Li et al. 2024 (MC-SMoE)'),
           ('sub_moe',
            'K-means on output similarity, joint-SVD shared basis, frequency-weighted merge of expert factors',
            'Li et al. 2025 (Sub-MoE)')]


def _listing() -> str:
    return "\n".join(f"  {name:<9} {desc} ({paper})" for name, desc, paper in LISTING)


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli._ops_args import add_calibration_args, add_io_args

    p = sub.add_parser("merge", help="merge experts of a trained run (hc_smoe, m_smoe, mc_smoe, sub_moe, dern)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Merge each layer's experts into fewer; the original router routes every member "
                                   "of a group to its merged expert. The result is an ordinary run directory.",
                       epilog=lambda: "methods:\n" + _listing())
    add_io_args(p)
    p.add_argument("--method", default="hc_smoe", help="merging method (see below; '-' or '_')")
    p.add_argument("--keep", default="0.5", help="merged experts per layer: a fraction in (0, 1] or a count")
    p.add_argument("--options", default=None, help='method options as JSON, e.g. \'{"rank": 16}\' (sub_moe)')
    add_calibration_args(p)
    p.set_defaults(func=cmd_merge)

"""`moelab skip RUN --method modes --rate 0.3 --out RUN2`: skip low-importance experts at inference."""

from __future__ import annotations

import argparse


def cmd_skip(args: argparse.Namespace) -> int:
    from moelab.cli._ops_args import calibration_config, report
    from moelab.ops.runner import run_op

    m = run_op(args.run_dir, args.out, "skip", args.method, 1.0, calibration_config(args),
               extra={"rate": args.rate, "search_batches": args.search_batches}, overwrite=args.overwrite,
               step=args.step, calib_file=args.calib_file)
    report(m, args.out)
    print(f"threshold {m['threshold']:.5g}: realised skip rate {m['realised_rate']:.3f} "
          f"(target {m['target_rate']}); experts per token {m['experts_per_token']}")
    return 0


# (name, description, paper) of moelab.ops.skip.SKIP_METHODS, static so that `--help` imports no torch
# (tests/ops/test_cli_light.py checks it against the registry)
LISTING = [('modes',
            'skip when layer importance x router probability < threshold; frontier search for the rate',
            'Huang et al. 2025 (MoDES)'),
           ('threshold',
            'skip experts whose router probability is under a global threshold',
            'baseline of Huang et al. 2025 (MoDES); Lu et al. 2024')]


def _listing() -> str:
    return "\n".join(f"  {name:<9} {desc} ({paper})" for name, desc, paper in LISTING)


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli._ops_args import add_calibration_args, add_io_args

    p = sub.add_parser("skip", help="skip experts at inference (modes, threshold) for a target skip rate",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Install training-free expert skipping (a 'wrapped' router in the saved config) "
                                   "with the threshold found for --rate; the result is an ordinary run directory.",
                       epilog=lambda: "methods:\n" + _listing())
    add_io_args(p)
    p.add_argument("--method", default="modes", help="skipping method (see below)")
    p.add_argument("--rate", type=float, default=0.3, help="target fraction of routed expert slots to skip, in [0, 1)")
    p.add_argument("--search-batches", type=int, default=4, help="calibration batches per frontier-search step")
    add_calibration_args(p)
    p.set_defaults(func=cmd_skip)

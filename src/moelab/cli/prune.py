"""`moelab prune RUN --method reap --keep 0.5 --out RUN2`: remove experts from a trained run."""

from __future__ import annotations

import argparse


def cmd_prune(args: argparse.Namespace) -> int:
    from moelab.cli._ops_args import calibration_config, parse_keep, report
    from moelab.ops.runner import run_op

    extra = {"scope": args.scope, "renormalize": args.renormalize, "guard_super_experts": args.guard_super_experts,
             "cap_k": args.cap_k, "task": args.task}
    m = run_op(args.run_dir, args.out, "prune", args.method, parse_keep(args.keep), calibration_config(args),
               extra=extra, overwrite=args.overwrite, step=args.step, calib_file=args.calib_file)
    report(m, args.out)
    return 0


# (name, description, paper) of moelab.ops.prune.PRUNE_CRITERIA, static so that `--help` imports no torch
# (tests/ops/test_cli_light.py checks it against the registry)
LISTING = [('ean',
            'summed expert output norm over routed tokens',
            'Jaiswal et al. 2025 (Finding Fantastic Experts in MoEs)'),
           ('easy_ep', 'gate x output norm x token contribution (1 - cos before/after)', 'Dong et al. 2025 (EASY-EP)'),
           ('frequency',
            'routed-token count per expert',
            'baseline in Lu et al. 2024 (Not All Experts are Equal); Lasby et al. 2025 (REAP)'),
           ('reap', 'mean of gate x expert output norm over routed tokens', 'Lasby et al. 2025 (REAP)'),
           ('soft_count',
            'summed gate weight per expert over its routed tokens',
            'soft activation frequency baseline of Lasby et al. 2025 (REAP)'),
           ('tcess', 'PreMoe task-conditioned expected selection score', 'Pei et al. 2025 (PreMoe)')]


def _listing() -> str:
    return "\n".join(f"  {name:<11} {desc} ({paper})" for name, desc, paper in LISTING)


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli._ops_args import add_calibration_args, add_io_args

    p = sub.add_parser("prune", help="prune experts of a trained run (frequency, soft_count, ean, reap, easy_ep, tcess)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Remove experts (their router rows too) by a calibration criterion; the result is "
                                   "an ordinary run directory with ops_manifest.json.",
                       epilog=lambda: "criteria:\n" + _listing())
    add_io_args(p)
    p.add_argument("--method", default="reap", help="pruning criterion (see below; '-' or '_')")
    p.add_argument("--keep", default="0.5", help="fraction of experts to keep in (0, 1], or an expert count per layer")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="per-layer or global budget")
    p.add_argument("--renormalize", default=None, action=argparse.BooleanOptionalAction,
                   help="set the router's renormalize option on pruned layers (default: unchanged)")
    p.add_argument("--guard-super-experts", action="store_true", help="always keep Super Experts (Su et al. 2025)")
    p.add_argument("--cap-k", action="store_true", help="lower k where fewer than k experts remain (else an error)")
    p.add_argument("--task", default=None, help="tcess: the domain to prune for (default: all calibration tokens)")
    add_calibration_args(p)
    p.set_defaults(func=cmd_prune)

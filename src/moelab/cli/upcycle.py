"""``moelab upcycle``: turn a dense run into an MoE run (sparse, granular, carve), grow an MoE run's
experts (grow), or combine several dense runs (dume). Continue with ``moelab train --init-from OUT``."""

from __future__ import annotations

import argparse
import json


# the registry's names (UPCYCLERS; tests/ops/test_cli_light.py checks them), so that `--help` imports no torch
UPCYCLE_METHODS = ('carve', 'dume', 'granular', 'grow', 'sparse')


# (name, description, paper) of moelab.ops.upcycle.UPCYCLERS, static so that `--help` imports no torch
# (tests/ops/test_cli_light.py checks it against the registry)
LISTING = [('carve',
            'cluster FFN neurons by activation into experts; distil a router',
            'LaDiMo; Read-ME (Cai et al. 2024); MoEfication (Zhang et al. 2022)'),
           ('dume',
            'several dense runs -> one MoE, ridge-regression router (training-free)',
            'DUME (training-free dynamic upcycling; seed catalog #11)'),
           ('granular',
            'split each FFN into G shards, E/G copies, virtual-group router',
            'He et al. 2024 (Upcycling LLMs into MoE; Megatron granular upcycling)'),
           ('grow',
            'duplicate experts E -> mE, k fixed, router rows copied + perturbation',
            'Dwivedi et al. 2026 (Expert Upcycling, arXiv 2604.19835)'),
           ('sparse',
            'copy each dense FFN into E experts + a fresh router',
            'Komatsuzaki et al. 2023 (Sparse Upcycling); Nakamura et al. 2025 (Drop-Upcycling)')]


def _listing() -> str:
    return "\n".join(f"  {name:9s} {desc} ({paper})" for name, desc, paper in LISTING)


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("upcycle", help="upcycle a dense run into an MoE run, or grow an MoE run's experts",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write OUT, a run directory at step 0 whose MoE layers are built from RUN's "
                                   "weights. Then `moelab train --init-from OUT --run-dir NEW` continues it with a "
                                   "fresh optimizer.",
                       epilog=lambda: "methods:\n" + _listing())
    p.add_argument("runs", nargs="+", metavar="RUN", help="source run directory (dume: several)")
    p.add_argument("--method", required=True, choices=UPCYCLE_METHODS, help="the recipe")
    p.add_argument("--out", required=True, metavar="DIR", help="output run directory")
    p.add_argument("--num-experts", type=int, help="experts per MoE layer (sparse/granular/carve: default 8; "
                   "grow: the target count, default factor x E)")
    p.add_argument("--k", type=int, help="experts per token (default 2; grow keeps the source's k)")
    p.add_argument("--every", type=int, help="upcycle every n-th dense block (default 1: all)")
    p.add_argument("--layers", type=int, nargs="+", help="upcycle exactly these dense blocks")
    p.add_argument("--shared", type=int, dest="num_shared_experts", help="shared experts (copies of the FFN)")
    p.add_argument("--noise", "--drop-ratio", type=float, dest="drop_ratio",
                   help="Drop-Upcycling: re-initialise this fraction of each expert's hidden units")
    p.add_argument("--granularity", type=int, help="granular: shards per FFN (default 2)")
    p.add_argument("--factor", type=int, help="grow: E -> factor x E (default 2)")
    p.add_argument("--mode", choices=["copy", "phased"], help="grow: 'copy' (paper) or 'phased' (exact at step 0)")
    p.add_argument("--perturb", type=float, help="grow: router-row perturbation, relative to the row std")
    p.add_argument("--utility", action="store_true", default=None,
                   help="grow: duplicate experts in proportion to gradient importance on the run's data")
    p.add_argument("--seed", type=int, help="seed of the fresh router and noise (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_upcycle)


_OPTION_NAMES = ("num_experts", "k", "every", "layers", "num_shared_experts", "drop_ratio", "granularity", "factor",
                 "mode", "perturb", "utility", "seed")


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moelab.errors import MoelabError
    from moelab.ops.upcycle.runs import make_options, upcycle_run

    kw = {n: getattr(args, n) for n in _OPTION_NAMES}
    if args.method == "dume":
        from moelab.ops.upcycle.dume import dume_runs

        out = dume_runs(args.runs, make_options("dume", **kw), args.out, overwrite=args.overwrite)
    else:
        if len(args.runs) != 1:
            raise MoelabError(f"method={args.method!r} takes one RUN; got {len(args.runs)} (only 'dume' combines runs)")
        out = upcycle_run(args.runs[0], args.method, make_options(args.method, **kw), args.out, overwrite=args.overwrite)
    record = json.loads((out / "upcycle.json").read_text())
    print(json.dumps({"out": str(out), "method": record["method"], "params": record.get("params")}, indent=1))
    return 0

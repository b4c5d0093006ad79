"""`moelab depth-route RUN --method drllm|router-tuning|duo --budget 0.75 --out RUN2`: routing across depth
(moelab.ops.depth): add per-layer depth routers to a trained model, fit them, compare with the unmodified model."""

from __future__ import annotations

import argparse

from moelab.errors import MoelabError

# (name, description, paper) of moelab.ops.depth.DEPTH_METHODS, static so that `--help` imports no torch
# (tests/ops/test_cli_light.py checks it against the registry)
LISTING = [('drllm',
            'per-layer skip/execute/repeat routers supervised by MCTS under a budget',
            'Heakl et al. 2025 (Dr.LLM)'),
           ('duo',
            'per-token skip / small FFN / big FFN routers with an oracle analysis',
            'Alizadeh et al. 2024 (Duo-LLM)'),
           ('router_tuning',
            'MindSkip attention-skip routers, only the routers trained',
            'He et al. 2024 (Router-Tuning / MindSkip)')]


def _listing() -> str:
    return "\n".join(f"  {name:<14} {desc} ({paper})" for name, desc, paper in LISTING)


def _options(pairs: list[str] | None) -> dict:
    import json

    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoelabError(f"--option {item!r} is not valid; expected KEY=VALUE (e.g. simulations=64)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_depth_route(args: argparse.Namespace) -> int:
    from moelab.ops.depth import DepthConfig
    from moelab.ops.depth.run import depth_route

    cfg = DepthConfig(method=args.method, budget=args.budget, seed=args.seed, train_windows=args.train_windows,
                      eval_windows=args.eval_windows, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      options=_options(args.option)).validate()
    manifest, md = depth_route(args.run_dir, args.out, cfg, overwrite=args.overwrite, step=args.step)
    print(md)
    print(f"budget {cfg.budget:g} of {manifest['budget_unit']}; wrote {args.out} (table: {args.out}/depth_route.md, "
          f"details: {args.out}/depth_route.json)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli._ops_args import add_io_args

    p = sub.add_parser("depth-route", help="route across depth: skip / execute / repeat layers (drllm, router-tuning, duo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Add a depth router to every block of a trained run, fit it on the run's training "
                                   "split under --budget (a fraction of the model's compute per token), and compare "
                                   "with the unmodified model on the test split: perplexity per domain and overall, "
                                   "layers and FLOPs executed per token. The result is an ordinary run directory "
                                   "(`moelab eval` / `moelab generate` accept it).",
                       epilog=lambda: "methods:\n" + _listing())
    add_io_args(p)
    p.add_argument("--method", required=True, help="drllm, router-tuning or duo (see below)")
    p.add_argument("--budget", type=float, default=0.75, help="fraction of the unmodified model's compute, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows, search and router training")
    p.add_argument("--train-windows", type=int, default=64, help="training windows (search / router training)")
    p.add_argument("--eval-windows", type=int, default=16, help="test windows per domain")
    p.add_argument("--steps", type=int, default=200, help="router training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="router learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward / training step")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable: drllm simulations, uct_c, hidden, windows; router_tuning "
                        "granularity (sequence|token), threshold, gradient_scale; duo small_ff, small_steps, "
                        "max_patterns, router_lr")
    p.set_defaults(func=cmd_depth_route)

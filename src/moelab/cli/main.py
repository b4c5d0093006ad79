"""The ``moelab`` command line. Each subcommand lives in its own module of ``moelab.cli``
and exposes ``register(subparsers)``; add a module name to ``COMMAND_MODULES`` to add one.

Start-up rule (``moelab --help`` and every ``moelab X --help`` parse without importing torch):
every module in ``COMMAND_MODULES`` is imported and its ``register()`` run on every call, so both must
stay cheap. At module level and in ``register()`` import only the standard library, ``moelab.errors``
and torch-free config modules (``moelab.*.config``, ``moelab.train.presets``); import torch, numpy,
scipy, pandas, transformers and any module that loads them inside the command function that needs them.
Help text that is expensive to build can be given as a callable ``epilog=lambda: ...``: the
``MoelabParser`` of every subcommand calls it only when help is printed. ``tests/cli/test_startup.py``
checks the rule for every registered command and subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moelab import __version__
from moelab.cli import _ux
from moelab.errors import MoelabError

# One entry per module of moelab.cli that adds subcommands (each owns its own file).
COMMAND_MODULES: list[str] = ["routers", "analyze", "train", "route", "sweep", "reproduce", "reroute", "dist", "hf",
                              "upcycle", "finetune", "prune", "merge", "skip", "compress_compare", "depth_route"]


class MoelabParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``epilog`` may be a zero-argument callable, called only to print help."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = MoelabParser(
        prog="moelab",
        description="moelab: routing in Mixture-of-Experts — train, compare and analyse routers.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=MoelabParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"moelab.cli.{name}").register(sub)
    _ux.state_defaults(parser)
    _ux.describe_subcommands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if (unknown := _ux.unknown_command(parser, sys.argv[1:] if argv is None else argv)):
        print(unknown, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(_ux.pipe_safe(args.func, args) or 0)
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

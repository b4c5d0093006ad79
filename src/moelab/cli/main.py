"""The ``moelab`` command line. Each subcommand lives in its own module of ``moelab.cli``
and exposes ``register(subparsers)``; add a module name to ``COMMAND_MODULES`` to add one."""

from __future__ import annotations

import argparse
import importlib
import sys

from moelab import __version__
from moelab.cli import _ux
from moelab.errors import MoelabError

# One entry per module of moelab.cli that adds subcommands (each owns its own file).
COMMAND_MODULES: list[str] = ["routers", "analyze", "train", "route", "sweep", "reproduce", "reroute", "dist", "hf",
                              "upcycle", "finetune", "prune", "merge", "skip", "compress_compare"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="moelab: routing in Mixture-of-Experts — train, compare and analyse routers.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"moelab.cli.{name}").register(sub)
    _ux.state_defaults(parser)
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

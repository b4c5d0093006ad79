"""Small command-line behaviours the ecosystem's tools share (kept apart from main.py's structure):
quiet exit when the reader of stdout goes away (``moelab routers | head``), and "did you mean"
for a mistyped command. Imports nothing heavy (no torch)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from moelab.errors import did_you_mean

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command cut off by `head`


def pipe_safe(func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func``; when stdout's reader has gone (BrokenPipeError), stop quietly with exit status 141
    (stdout is pointed at /dev/null so the interpreter's final flush does not raise again)."""
    try:
        result = func(*args)
        sys.stdout.flush()
        return result
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:  # noqa: SLF001 -- argparse has no public accessor for sub-commands
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return list(action.choices)
    return []


def unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The error line for a first word that is not a command (with the closest ones), else None."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None or argv.index(first) != 0:
        return None
    commands = _commands(parser)
    if first in commands:
        return None
    return (f"moelab: error: {first!r} is not a moelab command{did_you_mean(first, commands)}; "
            f"commands: {', '.join(commands)} (moelab --help)")


def state_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to every option's help that has a default and does not state it yet."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                state_defaults(sub)
            continue
        d = action.default
        if not action.option_strings or not action.help or action.help == argparse.SUPPRESS:
            continue
        if d in (None, False, [], argparse.SUPPRESS) or "default" in action.help:
            continue
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        action.help = f"{action.help} (default: {str(shown).replace('%', '%%')})"


def describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command without a description its one-line help as one, so
    `moelab VERB --help` always says what the command does."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}  # noqa: SLF001
        for name, sub in action.choices.items():
            if not sub.description and helps.get(name):
                h = helps[name]
                sub.description = h[0].upper() + h[1:] + ("" if h.endswith(".") else ".")
            describe_subcommands(sub)

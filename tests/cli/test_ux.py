"""Command-line behaviour users expect from the ecosystem's tools: quiet broken pipes, did-you-mean,
help with defaults, honest summary labels."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import _ux
from moelab.cli.main import build_parser, main
from moelab.errors import MoelabError, check_choice, did_you_mean

SRC = str(Path(__file__).parents[2] / "src")


def test_broken_pipe_is_quiet():
    """`moelab routers | true`: the reader is gone before moelab writes; no traceback, status 141."""
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run(f"{sys.executable} -m moelab.cli.main routers | true; echo rc=${{PIPESTATUS[0]}}",
                       shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stdout.strip() == "rc=141"


def test_pipe_safe_passes_results_and_errors_through():
    assert _ux.pipe_safe(lambda x: x + 1, 1) == 2
    with pytest.raises(MoelabError):
        _ux.pipe_safe(lambda: check_choice("p", "x", ["y"]))


def test_mistyped_command_suggests(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "'trian' is not a moelab command; did you mean 'train'?" in err and "demo" in err
    assert _ux.unknown_command(build_parser(), ["--version"]) is None


def test_mistyped_config_key_and_router_suggest(capsys):
    assert main(["train", "--moe.routr", "x"]) == 2
    assert "did you mean 'router'?" in capsys.readouterr().err
    assert main(["train", "--moe.router", "sofmax_topk"]) == 2
    assert "did you mean 'softmax_topk'" in capsys.readouterr().err


def test_did_you_mean():
    assert did_you_mean("trian", ["train", "eval"]) == "; did you mean 'train'?"
    assert did_you_mean("zzzz", ["train", "eval"]) == ""
    assert did_you_mean(3, ["train"]) == ""


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", h, d) for a, h, d in _options(sub))
        elif action.option_strings and action.dest not in ("help", "version"):
            yield "/".join(action.option_strings), action.help or "", action.default


def test_every_option_has_help_and_states_its_default():
    """Every option of every command (`route` and its sub-commands included) has help; one with a
    default (not off/None) states it."""
    opts = list(_options(build_parser()))
    assert any(name.startswith("route compare ") for name, _, _ in opts)
    assert any(name.startswith("route serve ") for name, _, _ in opts)
    missing = [name for name, h, d in opts
               if not h or (d not in (None, False, [], argparse.SUPPRESS) and "default" not in h)]
    assert missing == []


def _parsers(parser: argparse.ArgumentParser, name: str = "moelab"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_command_has_a_description_and_no_raw_markup():
    """`moelab route --help` printed the module docstring with ``double backticks``; every help page
    is plain text and says what its command does."""
    pages = dict(_parsers(build_parser()))
    assert {"moelab route", "moelab route compare", "moelab route predict", "moelab route serve"} <= set(pages)
    for name, p in pages.items():
        text = p.format_help()
        assert p.description and len(p.description) > 20, name
        assert not re.search(r"``|:(mod|class|func|meth|attr):`", text), (name, text[:300])


def test_route_help_lists_the_subcommands_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["route", "compare", "--help"])
    out = capsys.readouterr().out
    assert "CV-tune and fit every router" in out and "(default: 0.3)" in out and "(default: 200)" in out


def test_summary_labels_the_steps_each_metric_is_from():
    from moelab.cli.train import format_metrics

    s = {"val_ppl": 9.0, "val_loss": 2.2, "eval_step": 200, "per_domain": {}, "load_max_over_mean": 1.2,
         "load_cv": 0.1, "balance_steps": [231, 250], "train_loss": 2.0, "step": 250, "steps": 600,
         "tokens_per_s": 1000.0, "params_total": 10, "params_active": 5}
    text = format_metrics(s)
    assert "at step 200" in text and "mean of steps 231-250 (20 steps)" in text and "at step 250 of 600" in text
    assert "last 50 steps" not in text
    assert "no evaluation yet" in format_metrics({**s, "eval_step": None, "val_ppl": None})
    assert "no steps this session" in format_metrics({**s, "balance_steps": None})


def test_interrupted_run_summary_has_the_real_window(tmp_path, monkeypatch):
    """A run stopped after 3 steps reports balance over steps 1-3, not 'the last 50'."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from train_micro import micro_config

    from moelab.train.trainer import train

    summary = train(micro_config(tmp_path, steps=20), tmp_path / "run", progress="off", until_step=3)
    assert summary["balance_steps"] == [1, 3] and summary["step"] == 3

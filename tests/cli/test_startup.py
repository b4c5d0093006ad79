"""Start-up: ``moelab --help`` and every ``moelab X [Y] --help`` parse without importing torch (a behaviour,
checked in a fresh interpreter; the timing itself is benchmarks/startup.py's job), and the lazy
``import moelab`` keeps the public API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import moelab

SRC = Path(__file__).parents[2] / "src"
HEAVY = ("torch", "numpy", "scipy", "pandas", "sklearn", "matplotlib", "safetensors", "transformers")

# Runs every help page of the parser tree in one fresh interpreter, then reports the heavy modules loaded.
_PROBE = """
import argparse, contextlib, io, json, sys
from moelab.cli.main import build_parser, main

def commands(parser, prefix):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, prefix + [name])

seen = []
for argv in commands(build_parser(), []):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv + ["--help"])
        except SystemExit:
            pass
    seen.append([" ".join(argv), len(out.getvalue())])
print(json.dumps({"pages": seen, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def _probe() -> dict:
    code = f"HEAVY = {HEAVY!r}\n" + _PROBE
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_help_pages_import_no_heavy_module():
    report = _probe()
    pages = dict(report["pages"])
    assert {"", "train", "generate", "route", "sweep"} <= set(pages)  # the walk reached the commands
    assert any(p.startswith("route ") for p in pages)                 # ... and nested subcommands
    assert all(n > 100 for n in pages.values()), pages                # every page printed a help text
    assert report["heavy"] == []


def test_import_moelab_is_light_but_exports_resolve():
    code = "import sys, moelab; print(int('torch' in sys.modules)); moelab.MoELayer; print(int('torch' in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC)}, timeout=120)
    assert res.stdout.split() == ["0", "1"], res.stderr


def test_lazy_names_are_the_defining_modules_objects():
    from moelab.layers.moe import MoELayer
    from moelab.layers.routers import ROUTERS

    assert moelab.MoELayer is MoELayer and moelab.ROUTERS is ROUTERS
    assert moelab.layers.moe.MoELayer is MoELayer            # subpackages reachable as attributes
    assert set(moelab.__all__) <= set(dir(moelab))


def test_unknown_attribute_raises_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        moelab.no_such_name  # noqa: B018

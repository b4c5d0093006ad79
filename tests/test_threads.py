"""moelab's OpenMP wait policy: PASSIVE unless the user chose, set before torch loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelab import _threads

SRC = str(Path(_threads.__file__).resolve().parents[1])


@pytest.mark.parametrize("env, applied, policy", [
    ({}, "PASSIVE", "PASSIVE"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, None, "ACTIVE"),  # the user's choice wins
    ({"MOELAB_OMP_WAIT_POLICY": "default"}, None, None),  # the runtime's own default
    ({"MOELAB_OMP_WAIT_POLICY": "Passive"}, "PASSIVE", "PASSIVE"),
])
def test_configure(env, applied, policy):
    assert _threads.configure(env) == applied
    assert env.get("OMP_WAIT_POLICY") == policy


def test_configure_bad_knob_warns_and_uses_passive(capsys):
    env = {"MOELAB_OMP_WAIT_POLICY": "spin"}
    assert _threads.configure(env) == "PASSIVE"
    assert "MOELAB_OMP_WAIT_POLICY='spin' is not valid; choose one of: 'passive', 'default'" in capsys.readouterr().err


def test_import_moelab_sets_it_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MOELAB_OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = SRC
    code = ("import os, sys, moelab, moelab._threads as t; "
            "print(os.environ.get('OMP_WAIT_POLICY'), t.TORCH_LOADED_FIRST, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # set first; `import moelab` is light (lazy exports), so torch loads later, after the policy is set
    assert out.split() == ["PASSIVE", "False", "False"]

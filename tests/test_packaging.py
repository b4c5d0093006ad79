"""The wheel installs into a clean virtual environment and works from there (.ci/wheel_check)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv():
    """About 15 s: builds the wheel and sdist, installs the wheel with --no-deps into a fresh venv that
    borrows this interpreter's dependencies, then runs `moelab --version` and a tiny forward there."""
    r = subprocess.run(["bash", str(ROOT / ".ci" / "wheel_check"), sys.executable], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "moelab-0.1.0-py3-none-any.whl" in r.stdout and "moelab 0.1.0" in r.stdout
    assert "wheel ok:" in r.stdout and "/venv/lib/" in r.stdout


def test_makefile_torch_pin_is_overridable(tmp_path):
    """`make install TORCH_PIN=... TORCH_INDEX=...` installs that torch first (dry run: nothing executes)."""
    def dry(*extra):
        r = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path}/v", *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "pip install" in line]

    default = dry()
    assert 'pip install -q  "torch==2.13.0"' in default[1] and "-e '.[dev,hf,serve]'" in default[2]
    custom = dry("TORCH_PIN=torch==2.13.0+cu128", "TORCH_INDEX=https://download.pytorch.org/whl/cu128")
    assert custom[1].endswith('install -q --index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0+cu128"')

"""Fixtures for the analysis tests (helpers live in analysis_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from analysis_helpers import install_tiny_moe, train_micro_run  # noqa: E402


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A real 8-step training run (checkpoints at steps 4 and 8) with TinyMoE layers."""
    return train_micro_run(tmp_path_factory.mktemp("micro"))


@pytest.fixture
def tiny_moe(monkeypatch):
    """Make load_run rebuild the model with TinyMoE layers (the factory used to train micro_run)."""
    install_tiny_moe(monkeypatch)

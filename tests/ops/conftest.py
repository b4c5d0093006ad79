"""Fixtures for the ops tests: a tiny random model, a container holding bare MoELayers (the protocol's
non-moelab case), calibration windows, and a real micro training run (8 experts, k=2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parent))
from train_micro import micro_config  # noqa: E402

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.models.config import ModelConfig  # noqa: E402
from moelab.models.transformer import MoETransformer  # noqa: E402
from moelab.ops.calibrate import CalibrationWindows  # noqa: E402


@pytest.fixture
def toy_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff_dense=64,
                      moe=MoEConfig(d_ff=16, num_experts=8, k=2))
    return MoETransformer(cfg.validate()).eval()


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return CalibrationWindows(torch.randint(0, 32, (8, 12), generator=g), torch.tensor([0, 1] * 4), ["a", "b"])


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A real 6-step run (checkpoints at 3 and 6), 8 experts, k=2, two domains."""
    from moelab.train.trainer import train

    tmp = tmp_path_factory.mktemp("opsrun")
    cfg = micro_config(tmp, steps=6, ckpt_every=3, eval_every=0, log_every=3)
    cfg.model.moe.num_experts = 8
    cfg.data.val_fraction = 0.3
    train(cfg, tmp / "run", progress="off")
    return tmp / "run"


@pytest.fixture
def micro_dense(tmp_path):
    """A micro dense run config (every FFN dense) on the synthetic two-domain corpus."""
    def make(**kw):
        cfg = micro_config(tmp_path, **kw)
        cfg.model.moe_layers = "none"
        return cfg
    return make

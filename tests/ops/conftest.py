import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # train_micro

from train_micro import micro_config  # noqa: E402


@pytest.fixture
def micro_dense(tmp_path):
    """A micro dense run config (every FFN dense) on the synthetic two-domain corpus."""
    def make(**kw):
        cfg = micro_config(tmp_path, **kw)
        cfg.model.moe_layers = "none"
        return cfg
    return make

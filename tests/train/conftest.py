import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # moe_standin
sys.path.insert(0, str(Path(__file__).parent))  # train_micro

from train_micro import micro_config  # noqa: E402


@pytest.fixture
def micro(tmp_path):
    return lambda **kw: micro_config(tmp_path, **kw)


@pytest.fixture(autouse=True)
def moe_layer(monkeypatch):
    """Use the real MoELayer when it exists, else the test stand-in."""
    try:
        import moelab.layers.moe  # noqa: F401
    except ImportError:
        from moe_standin import install_standin

        install_standin(monkeypatch)

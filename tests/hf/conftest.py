import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # hf_helpers

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install 'moelab[hf]')")


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """Every family saved once per session: name -> (folder, the HF model object)."""
    from hf_helpers import family_configs, save_family

    root = tmp_path_factory.mktemp("hf_models")
    return {name: (root / name, save_family(name, root / name)) for name in family_configs()}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small text folder (two domains) so eval/analyze on an imported run is fast."""
    root = tmp_path_factory.mktemp("corpus")
    for d, text in (("code", "def f(x):\n    return x + 1\n"), ("prose", "The quick brown fox jumps over the dog. ")):
        (root / d).mkdir()
        for i in range(60):
            (root / d / f"doc{i}.txt").write_text(text * (3 + i % 5))
    return root

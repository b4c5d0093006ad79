import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # train_micro

from train_micro import write_corpus as _write_corpus  # noqa: E402


def write_corpus(root: Path, docs_per_domain: int = 10, words: int = 100, seed: int = 0) -> Path:
    """Two domains of synthetic text (letter words, number words) as a folder corpus."""
    return _write_corpus(root, docs_per_domain=docs_per_domain, words=words, seed=seed)


def micro_base(tmp_path: Path, steps: int = 8, ckpt_every: int = 4) -> dict:
    """Dotted overrides turning the tiny preset into a micro model on a local byte-level corpus."""
    corpus = write_corpus(tmp_path / "corpus")
    return {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 16,
        "model.d_ff_dense": 64, "model.vocab_size": 259,
        "moe.d_ff": 32, "moe.num_experts": 4, "moe.k": 2,
        "data.source": str(corpus), "data.tokenizer": "byte", "data.seq_len": 16, "data.val_fraction": 0.25,
        "data.test_fraction": 0.1, "data.cache_dir": str(tmp_path / "cache"),
        "train.steps": steps, "train.batch_size": 4, "train.lr": 1e-2, "train.warmup_steps": 2,
        "train.eval_every": 0, "train.eval_max_batches": 2, "train.ckpt_every": ckpt_every, "train.keep_last": 2,
        "train.log_every": 4, "train.threads": 1, "train.device": "cpu",
    }


@pytest.fixture
def micro(tmp_path):
    return lambda **kw: micro_base(tmp_path, **kw)

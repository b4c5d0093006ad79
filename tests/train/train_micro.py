"""Micro run configs on a synthetic two-domain corpus (shared by tests/train and tests/cli)."""

import random
from pathlib import Path

from moelab.data.corpus import DataConfig
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.train.config import RunConfig, TrainConfig


def write_corpus(root: Path, docs_per_domain: int = 12, words: int = 120, seed: int = 0) -> Path:
    """Two domains of synthetic text: alpha (letters words) and beta (number words)."""
    rng = random.Random(seed)
    vocab = {"alpha": ["ab", "cd", "efg", "hij", "kl", "mno"], "beta": ["12", "345", "6", "78", "90"]}
    for dom, ws in vocab.items():
        (root / dom).mkdir(parents=True, exist_ok=True)
        for i in range(docs_per_domain):
            (root / dom / f"doc{i}.txt").write_text(" ".join(rng.choice(ws) for _ in range(words)) + "\n")
    return root


def micro_config(tmp_path: Path, **train_kw) -> RunConfig:
    corpus = write_corpus(tmp_path / "corpus")
    tk = dict(steps=20, batch_size=4, lr=1e-2, warmup_steps=3, eval_max_batches=2, log_every=5)
    tk.update(train_kw)
    return RunConfig(
        model=ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff_dense=64,
                          moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, k=2, dispatch="sorted"), moe_layers="all"),
        data=DataConfig(source=str(corpus), tokenizer="byte", seq_len=16, val_fraction=0.25, test_fraction=0.1,
                        cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(**tk),
    )

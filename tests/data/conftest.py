import pytest

from moelab.data import DataConfig, load_corpus, train_tokenizer

SMALL_CAP = 150_000  # chars per domain: keeps the embedded-corpus tests fast


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every data test writes its cache under a session tmp folder, never ~/.cache/moelab."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


@pytest.fixture(scope="session")
def small_cfg(tmp_path_factory):
    return DataConfig(max_chars_per_domain=SMALL_CAP, cache_dir=str(tmp_path_factory.mktemp("cache")),
                      vocab_size=600, tokenizer_train_chars=100_000)


@pytest.fixture(scope="session")
def small_splits(small_cfg):
    return load_corpus(small_cfg)


@pytest.fixture(scope="session")
def small_bpe(small_splits, small_cfg):
    return train_tokenizer(small_splits.train, "bpe", small_cfg.vocab_size,
                           max_train_chars=small_cfg.tokenizer_train_chars, cache_dir=small_cfg.cache_dir)

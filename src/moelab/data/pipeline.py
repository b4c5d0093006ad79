"""One call from a ``DataConfig`` to everything the trainer needs: splits, tokenizer, token counts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from moelab.data.corpus import SPLITS, CorpusSplits, DataConfig, load_corpus
from moelab.data.loader import TokenizedDocs, tokenize_documents
from moelab.data.tokenizer import Tokenizer, train_tokenizer
from moelab.errors import MoelabError


@dataclass(slots=True)
class PreparedData:
    """``splits`` (documents), ``tokenizer``, ``tokens`` (split -> TokenizedDocs), ``manifest`` (the
    corpus manifest plus ``tokenizer`` and ``tokens_per_split``: save it as RUN/data_manifest.json),
    ``timings_s`` (load, tokenizer, tokenise; not in the manifest so the manifest stays stable)."""

    splits: CorpusSplits
    tokenizer: Tokenizer
    tokens: dict[str, TokenizedDocs]
    manifest: dict[str, Any]
    timings_s: dict[str, float]


def prepare_data(cfg: DataConfig | None = None, *, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Load the corpus, train (or load the cached) tokenizer on the train split, tokenise every split.

    ``tokenizer`` given: use it instead of training one (required for ``cfg.tokenizer="pretrained"``,
    e.g. the tokenizer of an imported Hugging Face run)."""
    cfg = cfg if cfg is not None else DataConfig()
    t0 = time.perf_counter()
    splits = load_corpus(cfg)
    n_docs = splits.manifest["total_docs"]
    if not splits.train:
        raise MoelabError(f"train split has 0 documents (of {n_docs:,}; val_fraction={cfg.val_fraction}, "
                          f"test_fraction={cfg.test_fraction}); add data or lower the fractions")
    if cfg.val_fraction > 0 and not splits.val:
        raise MoelabError(f"val split has 0 documents (val_fraction={cfg.val_fraction} of {n_docs:,} "
                          "documents); add data, raise val_fraction, or set val_fraction=0 to skip evaluation")
    t1 = time.perf_counter()
    if tokenizer is None and cfg.tokenizer == "pretrained":
        raise MoelabError("tokenizer='pretrained' needs the run's tokenizer: prepare_data(cfg, tokenizer=run.tokenizer)")
    tok = tokenizer if tokenizer is not None else train_tokenizer(
        splits.train, cfg.tokenizer, cfg.vocab_size, max_train_chars=cfg.tokenizer_train_chars, cache_dir=cfg.cache_dir)
    t2 = time.perf_counter()
    tokens = {s: tokenize_documents(splits.split(s), tok, cache_dir=cfg.cache_dir) for s in SPLITS}
    t3 = time.perf_counter()
    manifest = dict(splits.manifest)
    manifest["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                             "pad_id": tok.pad_id, "bos_id": tok.bos_id, "fingerprint": tok.fingerprint,
                             "train_chars": cfg.tokenizer_train_chars}
    manifest["tokens_per_split"] = {s: {"total": int(len(tokens[s].tokens)),
                                        "per_domain": tokens[s].tokens_per_domain()} for s in SPLITS}
    return PreparedData(splits, tok, tokens, manifest,
                        {"load_corpus": t1 - t0, "tokenizer": t2 - t1, "tokenize": t3 - t2})

"""Tokenizers: byte-level BPE (Hugging Face ``tokenizers``) or plain bytes, behind one ``Tokenizer`` class.

Byte-level BPE (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.2; BPE
itself: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"): text is
mapped to bytes, pre-split with the GPT-2 regex, and merges are learned on the train split. Choices:

* no normaliser and ``add_prefix_space=False``, so ``decode(encode(x)) == x`` for every string;
* special tokens take the first ids: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|endoftext|>`` (EOS) = 2; the
  256 byte symbols follow, then the merges; ``vocab_size`` counts all of them;
* special-token strings inside the text are encoded as ordinary text (never as the special id);
* training uses at most ``max_train_chars`` characters (default 4 M): the train documents in sha1(doc_id)
  order until the budget is spent (whole documents, the last one cut), which keeps training a few
  seconds on 2 cores while covering every domain in proportion;
* trained tokenizers are cached in ``<cache_dir>/tokenizers/<key>.json``, key = sha1 of the training
  text and the settings, so a rerun on the same corpus loads instead of training.

Byte tokenizer: ids 0..255 are the UTF-8 bytes, then EOS = 256, BOS = 257, PAD = 258 (vocab 259);
``decode`` of arbitrary ids replaces invalid UTF-8 with U+FFFD.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from moelab.data.corpus import (Document, atomic_write_bytes, default_cache_dir, sha1_hex)
from moelab.errors import MoelabError, check_choice, check_range

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
BPE_SPECIALS = (PAD, BOS, EOS)
N_BYTES = 256
DEFAULT_MAX_TRAIN_CHARS = 4_000_000


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``/``bos_id``/``pad_id``,
    ``encode_batch``, ``save(path)`` (a JSON file) and ``Tokenizer.load(path)``."""

    def __init__(self, kind: str, hf_tokenizer=None):
        self.kind = check_choice("kind", kind, ("bpe", "byte"))
        self._hf = hf_tokenizer
        if kind == "bpe":
            if hf_tokenizer is None:
                raise MoelabError("kind='bpe' needs a trained tokenizers.Tokenizer")
            hf_tokenizer.encode_special_tokens = True  # "<|endoftext|>" in the text is plain text
            ids = [hf_tokenizer.token_to_id(t) for t in BPE_SPECIALS]
            if any(i is None for i in ids):
                raise MoelabError(f"tokenizer lacks the special tokens {BPE_SPECIALS}")
            self.pad_id, self.bos_id, self.eos_id = ids
            self.vocab_size = hf_tokenizer.get_vocab_size()
        else:
            self.eos_id, self.bos_id, self.pad_id = N_BYTES, N_BYTES + 1, N_BYTES + 2
            self.vocab_size = N_BYTES + 3

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8", "surrogatepass"))
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "byte":
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            specials = {self.eos_id: EOS, self.bos_id: BOS, self.pad_id: PAD}
            out, buf = [], bytearray()
            for i in ids:
                if i in specials:
                    out.append(buf.decode("utf-8", "replace"))
                    buf = bytearray()
                    out.append(specials[i])
                elif 0 <= i < N_BYTES:
                    buf.append(i)
                else:
                    raise MoelabError(f"token id={i} is out of range; expected 0 <= id < {self.vocab_size}")
            out.append(buf.decode("utf-8", "replace"))
            return "".join(out)
        return self._hf.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ identity / persistence
    def to_str(self) -> str:
        if self.kind == "byte":
            return json.dumps({"moelab_tokenizer": "byte", "eos_id": self.eos_id, "bos_id": self.bos_id,
                               "pad_id": self.pad_id, "vocab_size": self.vocab_size})
        return self._hf.to_str()

    @property
    def fingerprint(self) -> str:
        """sha1 of the serialised tokenizer (same tokenizer <=> same fingerprint)."""
        return sha1_hex(self.to_str())

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (the Hugging Face format for BPE; a small JSON for bytes), atomically."""
        atomic_write_bytes(Path(path), self.to_str().encode("utf-8"))

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        obj = json.loads(s)
        if obj.get("moelab_tokenizer") == "byte":
            return cls("byte")
        from tokenizers import Tokenizer as HFTokenizer

        return cls("bpe", HFTokenizer.from_str(s))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise MoelabError(f"path={str(path)!r} has no tokenizer.json")
        try:
            return cls.from_str(p.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 -- json and the tokenizers library raise several kinds
            raise MoelabError(f"tokenizer file {str(p)!r} is corrupted or truncated: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("byte")


def training_sample(docs: Sequence[Document], max_chars: int) -> list[str]:
    """The texts BPE is trained on: documents in sha1(doc_id) order until ``max_chars`` (last one cut)."""
    out, n = [], 0
    for d in sorted(docs, key=lambda d: sha1_hex("tok", d.doc_id)):
        if n >= max_chars:
            break
        t = d.text[: max_chars - n]
        out.append(t)
        n += len(t)
    return out


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def train_tokenizer(
    docs: Sequence[Document],
    kind: str = "bpe",
    vocab_size: int = 8192,
    *,
    max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Tokenizer:
    """Train (or load from the cache) a tokenizer on ``docs`` (the train split).

    ``kind="byte"`` ignores the documents. For BPE, ``vocab_size`` includes the 3 special tokens and
    the 256 bytes; it may come out smaller when the text has fewer distinct merges (tiny corpora).
    Cache: ``<cache_dir>/tokenizers/``, ``cache_dir=None`` means ``$MOELAB_CACHE`` or ``~/.cache/moelab``.
    """
    check_choice("kind", kind, ("bpe", "byte"))
    if kind == "byte":
        return byte_tokenizer()
    check_range("vocab_size", vocab_size, low=N_BYTES + len(BPE_SPECIALS) + 1)
    check_range("max_train_chars", max_train_chars, low=1)
    texts = training_sample(docs, max_train_chars)
    if not any(texts):
        raise MoelabError("docs has 0 characters of text; cannot train a BPE tokenizer")
    import tokenizers

    key = sha1_hex("bpe-v1", tokenizers.__version__, str(vocab_size), str(max_train_chars), *texts)
    path = default_cache_dir(cache_dir) / "tokenizers" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            return Tokenizer.load(path)
        except Exception:  # a corrupt cache entry is rebuilt
            pass
    tok = Tokenizer("bpe", _train_bpe(texts, vocab_size))
    if use_cache:
        tok.save(path)
    return tok

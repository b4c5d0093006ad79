"""Packed training stream and per-domain evaluation batches.

Shapes: B batch rows, L sequence length (``seq_len``).

Training (``TrainStream``): every epoch, documents are put in a seeded random order, each followed by
EOS, concatenated, and cut into windows of L+1 tokens with stride L (window i covers tokens
[i*L, i*L+L], so consecutive windows share one token and every token but the first is a label once);
the tail that does not fill a window is dropped. The windows are then visited in a second seeded random
order, B per batch (an incomplete last batch is dropped). Both orders come from
``numpy.random.default_rng([seed, epoch])``, so the position (epoch, cursor) determines the future
exactly: ``state_dict()`` / ``load_state_dict()`` resume with the very same next batches. ``domain_B`` is
the majority domain of the row's input tokens (ties: lowest domain index). No padding occurs in
training, so ``valid_BL`` is all True.

Evaluation (``eval_batches``): each domain is packed separately (its documents in a fixed
sha1(doc_id) order, EOS after each) and cut the same way, so every batch holds one domain and the
per-domain loss is exact. The last window of a domain is padded with ``pad_id``; there ``valid_BL`` is
False and ``labels_BL`` is -100 (a position is valid iff its label is a real token). Per-domain loss =
sum(token losses over valid positions) / sum(valid) over that domain's batches. The last batch of a
domain may have fewer than B rows. ``max_batches`` caps the batches *per domain*.

Tokenised documents are cached (``<cache_dir>/tokens/<key>.npz``, key = content hash of the documents +
tokenizer fingerprint) and memoised in the process, so the embedded corpus tokenises once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moelab.data.corpus import Document, atomic_write_bytes, content_hash, default_cache_dir, sha1_hex
from moelab.data.tokenizer import Tokenizer
from moelab.errors import MoelabError, check_range

IGNORE_INDEX = -100


@dataclass(slots=True, eq=False)
class Batch:
    """``input_ids_BL`` (int64), ``labels_BL`` (int64, -100 where not valid), ``valid_BL`` (bool),
    ``domain_B`` (int64 index into the domain list)."""

    input_ids_BL: torch.Tensor
    labels_BL: torch.Tensor
    valid_BL: torch.Tensor
    domain_B: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.input_ids_BL, self.labels_BL, self.valid_BL, self.domain_B)))

    @property
    def n_valid(self) -> int:
        return int(self.valid_BL.sum())


@dataclass(slots=True)
class TokenizedDocs:
    """Documents as one flat token array: document i is ``tokens[offsets[i]:offsets[i+1]]`` (no EOS)."""

    tokens: np.ndarray
    offsets: np.ndarray
    domains: list[str]  # per document
    doc_ids: list[str]
    key: str  # content hash + tokenizer fingerprint

    def __len__(self) -> int:
        return len(self.doc_ids)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def tokens_per_domain(self) -> dict[str, int]:
        lens = np.diff(self.offsets)
        out: dict[str, int] = {}
        for d, n in zip(self.domains, lens.tolist()):
            out[d] = out.get(d, 0) + n
        return dict(sorted(out.items()))


_MEMO: "OrderedDict[str, TokenizedDocs]" = OrderedDict()
_MEMO_SIZE = 6


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedDocs:
    """Tokenise ``docs`` (memoised in the process and cached on disk unless ``use_cache=False``)."""
    docs = list(docs)
    key = sha1_hex("tokens-v1", content_hash(docs), tokenizer.fingerprint)
    if use_cache and key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    path = default_cache_dir(cache_dir) / "tokens" / f"{key}.npz"
    td = None
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                td = TokenizedDocs(z["tokens"], z["offsets"], meta["domains"], meta["doc_ids"], key)
        except (OSError, ValueError, KeyError):
            td = None
    if td is None:
        ids = tokenizer.encode_batch([d.text for d in docs])
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
        tokens = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(offsets[-1]))
        td = TokenizedDocs(tokens, offsets, [d.domain for d in docs], [d.doc_id for d in docs], key)
        if use_cache:
            buf = io.BytesIO()
            meta = json.dumps({"domains": td.domains, "doc_ids": td.doc_ids})
            np.savez(buf, tokens=td.tokens, offsets=td.offsets, meta=np.array(meta))
            atomic_write_bytes(path, buf.getvalue())
    if use_cache:
        _MEMO[key] = td
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return td


def _as_tokenized(data, tokenizer: Tokenizer, cache_dir) -> TokenizedDocs | np.ndarray:
    if isinstance(data, TokenizedDocs):
        return data
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim != 1:
            raise MoelabError(f"token array has shape {data.shape}; expected a 1-D array of token ids")
        return data
    docs = list(data)
    if docs and not isinstance(docs[0], Document):
        raise MoelabError(f"docs holds {type(docs[0]).__name__}; expected Document, TokenizedDocs or a 1-D token array")
    return tokenize_documents(docs, tokenizer, cache_dir=cache_dir)


def _windows(stream: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    return stream[starts[:, None] + np.arange(width)[None, :]]


class TrainStream:
    """Endless stream of packed training batches with an exact, resumable position.

    ``TrainStream(docs_or_tokens, tokenizer, seq_len, batch_size, seed)``: ``docs_or_tokens`` is a list of
    ``Document``, a ``TokenizedDocs``, or a 1-D array of token ids (then taken as one stream, only the
    window order is shuffled and ``domain_B`` is 0). ``domains`` fixes the domain order of ``domain_B``
    (default: sorted domains of the documents; pass ``CorpusSplits.domains``).
    """

    def __init__(
        self,
        docs,
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        *,
        domains: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        check_range("seq_len", seq_len, low=1)
        check_range("batch_size", batch_size, low=1)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.tokenizer = tokenizer
        data = _as_tokenized(docs, tokenizer, cache_dir)
        if isinstance(data, np.ndarray):
            self._docs = [data.astype(np.int64)]
            self._doc_dom = np.zeros(1, dtype=np.int64)
            self.domains = list(domains) if domains is not None else ["all"]
            self._permute_docs = False
            self.fingerprint = sha1_hex("array", hashlib.sha1(np.ascontiguousarray(data, np.int64)).hexdigest())
        else:
            self.domains = list(domains) if domains is not None else sorted(set(data.domains))
            missing = sorted(set(data.domains) - set(self.domains))
            if missing:
                raise MoelabError(f"domains={self.domains!r} lacks the documents' domains {missing}")
            eos = np.array([tokenizer.eos_id], dtype=np.int64)
            self._docs = [np.concatenate([data.doc(i).astype(np.int64), eos]) for i in range(len(data))]
            index = {d: i for i, d in enumerate(self.domains)}
            self._doc_dom = np.array([index[d] for d in data.domains], dtype=np.int64)
            self._permute_docs = True
            self.fingerprint = data.key
        self.n_tokens = int(sum(len(d) for d in self._docs))
        need = self.batch_size * self.seq_len + 1
        if self.n_tokens < need:
            raise MoelabError(
                f"train split has {self.n_tokens:,} tokens but one batch needs {need:,} "
                f"(batch_size={self.batch_size} x seq_len={self.seq_len} + 1)")
        self.windows_per_epoch = (self.n_tokens - 1) // self.seq_len
        self.batches_per_epoch = self.windows_per_epoch // self.batch_size
        self.epoch, self.cursor = 0, 0
        self._built_epoch = -1

    # ------------------------------------------------------------------ epoch layout
    def _build_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._docs)) if self._permute_docs else np.arange(len(self._docs))
        self._stream = np.concatenate([self._docs[i] for i in order])
        self._dom_stream = np.repeat(self._doc_dom[order], [len(self._docs[i]) for i in order])
        self._window_order = rng.permutation(self.windows_per_epoch)
        self._built_epoch = epoch

    def next_batch(self) -> Batch:
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        if self._built_epoch != self.epoch:
            self._build_epoch(self.epoch)
        B, L = self.batch_size, self.seq_len
        w = self._window_order[self.cursor * B: (self.cursor + 1) * B]
        starts = w * L
        rows_BL1 = _windows(self._stream, starts, L + 1)
        dom_BL = _windows(self._dom_stream, starts, L)
        n_dom = max(len(self.domains), 1)
        counts_BD = np.zeros((B, n_dom), dtype=np.int64)
        np.add.at(counts_BD, (np.repeat(np.arange(B), L), dom_BL.reshape(-1)), 1)
        self.cursor += 1
        return Batch(
            input_ids_BL=torch.from_numpy(rows_BL1[:, :-1].copy()),
            labels_BL=torch.from_numpy(rows_BL1[:, 1:].copy()),
            valid_BL=torch.ones(B, L, dtype=torch.bool),
            domain_B=torch.from_numpy(counts_BD.argmax(axis=1)),
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """The exact data position (JSON-able). The random orders of an epoch are
        ``numpy.random.default_rng([seed, epoch])``, so (seed, epoch, cursor) is the whole RNG state."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "n_tokens": self.n_tokens, "fingerprint": self.fingerprint,
                "rng": "numpy.default_rng([seed, epoch])"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seq_len", "batch_size", "n_tokens", "fingerprint"):
            if k in state and state[k] != getattr(self, k):
                raise MoelabError(f"state_dict {k}={state[k]!r} does not match this stream's "
                                  f"{k}={getattr(self, k)!r}; resume with the same data and shapes")
        check_range("cursor", state["cursor"], low=0, high=self.batches_per_epoch)
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._built_epoch = -1


def eval_batches(
    docs,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    domains: Sequence[str] | None = None,
    *,
    max_batches: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[Batch]:
    """Deterministic evaluation batches, one domain at a time (``domain_B`` = index in ``domains``).

    ``max_batches`` caps the number of batches per domain (None: all). Documents whose domain is not in
    ``domains`` are skipped; domains without documents yield nothing.
    """
    check_range("seq_len", seq_len, low=1)
    check_range("batch_size", batch_size, low=1)
    if max_batches is not None:
        check_range("max_batches", max_batches, low=1)
    data = _as_tokenized(docs, tokenizer, cache_dir)
    if isinstance(data, np.ndarray):
        raise MoelabError("eval_batches needs documents (list[Document] or TokenizedDocs), not a token array")
    if len(data) == 0:
        raise MoelabError("docs is empty (0 documents); no evaluation batches can be made")
    domains = list(domains) if domains is not None else sorted(set(data.domains))
    L = int(seq_len)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    for di, dom in enumerate(domains):
        idx = [i for i in range(len(data)) if data.domains[i] == dom]
        if not idx:
            continue
        idx.sort(key=lambda i: sha1_hex("eval", data.doc_ids[i]))
        stream = np.concatenate([np.concatenate([data.doc(i).astype(np.int64), eos]) for i in idx])
        n = len(stream)
        if n < 2:
            continue
        starts = np.arange(0, n - 1, L)
        padded = np.concatenate([stream, np.full(L + 1, tokenizer.pad_id, dtype=np.int64)])
        n_batches = -(-len(starts) // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            s = starts[b * batch_size: (b + 1) * batch_size]
            rows_BL1 = _windows(padded, s, L + 1)
            valid_BL = (s[:, None] + np.arange(1, L + 1)[None, :]) < n
            labels_BL = np.where(valid_BL, rows_BL1[:, 1:], IGNORE_INDEX)
            yield Batch(
                input_ids_BL=torch.from_numpy(rows_BL1[:, :-1].copy()),
                labels_BL=torch.from_numpy(labels_BL),
                valid_BL=torch.from_numpy(valid_BL),
                domain_B=torch.full((len(s),), di, dtype=torch.int64),
            )

"""Corpora for the training lab: documents with a domain label, a deterministic split and a manifest.

The default corpus ("embedded") is built on the fly from files every CPython installation has, so the
lab trains without any download:

* domain ``"code"``: the standard library's ``.py`` files under ``sysconfig.get_paths()["stdlib"]``,
  one document per file, excluding ``site-packages``, test suites (any ``test``/``tests``/``idle_test``
  folder, e.g. ``test/``, ``idlelib/idle_test``, ``lib2to3/tests``, ``unittest/test``, ``ctypes/test``),
  ``__pycache__``, ``pydoc_data`` (used as prose below) and generated files: codec tables made by
  ``gencodec.py`` (``encodings/cp1252.py`` ...), ``_sysconfigdata_*.py``, ``html/entities.py``.
  Files over ``MAX_FILE_CHARS`` (256,000 characters) are skipped as "huge"; on CPython 3.11 none of
  the remaining sources is that large (the largest, ``_pydecimal.py``, has ~229k characters), so the
  cap only guards against odd installations.
* domain ``"prose"``: the documentation text in ``pydoc_data/topics.py`` (the values of its ``topics``
  dict), one document per topic.

The corpus is imbalanced (on CPython 3.11: ~11 M characters of code vs ~0.46 M of prose);
``DataConfig.max_chars_per_domain`` caps every domain (documents are taken whole, greedily in a
seeded-independent hash order, skipping those that would overflow the cap), and the manifest reports
the sizes per domain and split.

Split: a document goes to val/test/train by ``sha1(doc_id)`` mapped to a bucket in [0, 1): val if
bucket < val_fraction, test if < val_fraction + test_fraction, else train. It depends on the doc id
only (not on the seed or on the other documents), so it is stable across runs, seeds and caps.

Other sources: a folder of ``.txt``/``.md`` files (domain = first sub-folder name, files directly in
the folder take the folder's own name), a single text file (domain = file stem; cut into documents at
blank lines, ~``SINGLE_FILE_DOC_CHARS`` characters each, so it can be split), a ``.jsonl`` file (one
document per line, ``text_field``, optional ``domain_field``, otherwise the file stem), and Hugging
Face datasets (``"hf:<folder>"`` saved with ``save_to_disk``, or ``"hf:<name>"`` with
``hf_allow_download=True`` which calls ``datasets.load_dataset``); see ``moelab.data.sources``.

Built corpora are cached in ``cache_dir`` (default ``$MOELAB_CACHE`` or ``~/.cache/moelab``), keyed by
a fingerprint of the source files (path, size, mtime) and the config, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError, check_choice, check_range

CORPUS_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TOKENIZER_KINDS = ("bpe", "byte", "pretrained")


@dataclass(frozen=True, slots=True)
class Document:
    """One document: a stable id (used for the split), its text and its domain label."""

    doc_id: str
    text: str
    domain: str


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the text comes from, how it is split and tokenised.

    source: ``"embedded"`` (stdlib code + pydoc prose), a folder of .txt/.md files, a single text file,
        a ``.jsonl`` file, or ``"hf:<saved-folder-or-name>"``.
    text_field / domain_field: field names for JSONL and Hugging Face rows (domain_field optional).
    val_fraction / test_fraction: split by hash of the document id.
    tokenizer: ``"bpe"`` (byte-level BPE trained on the train split) or ``"byte"`` (256 bytes + specials);
        ``"pretrained"``: the run's own tokenizer (an imported Hugging Face model's), passed to
        ``prepare_data(cfg, tokenizer=...)``; nothing is trained.
    vocab_size: BPE vocabulary size including the special tokens (ignored for ``"byte"``).
    seq_len: tokens per training sequence.
    max_chars_per_domain: optional cap on each domain's characters (before the split).
    cache_dir: cache folder (None: ``$MOELAB_CACHE`` or ``~/.cache/moelab``).
    seed: shuffling seed of the training stream (the split does not depend on it).
    tokenizer_train_chars: BPE is trained on at most this many characters of the train split.
    hf_split: pick one split of a Hugging Face DatasetDict (None: all splits, re-split by hash).
    hf_allow_download: allow ``datasets.load_dataset(name)`` when ``hf:<name>`` is not a local folder.
    """

    source: str = "embedded"
    text_field: str = "text"
    domain_field: str | None = None
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    seq_len: int = 256
    max_chars_per_domain: int | None = None
    cache_dir: str | None = None
    seed: int = 0
    tokenizer_train_chars: int = 4_000_000
    hf_split: str | None = None
    hf_allow_download: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise MoelabError(
                f"source={self.source!r} is not valid; choose one of: 'embedded', a folder, a text file, "
                "a .jsonl file, 'hf:<saved-folder-or-name>'"
            )
        check_range("val_fraction", self.val_fraction, low=0.0, high=1.0, high_inclusive=False)
        check_range("test_fraction", self.test_fraction, low=0.0, high=1.0, high_inclusive=False)
        check_range("val_fraction + test_fraction", self.val_fraction + self.test_fraction,
                    low=0.0, high=1.0, high_inclusive=False)
        check_choice("tokenizer", self.tokenizer, TOKENIZER_KINDS)
        check_range("vocab_size", self.vocab_size, low=260, high=2**31 - 1)
        check_range("seq_len", self.seq_len, low=1)
        if self.max_chars_per_domain is not None:
            check_range("max_chars_per_domain", self.max_chars_per_domain, low=1)
        check_range("tokenizer_train_chars", self.tokenizer_train_chars, low=1)
        if not self.text_field:
            raise MoelabError(f"text_field={self.text_field!r} is not valid; expected a non-empty field name")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class CorpusSplits:
    """The corpus split into train/val/test, the sorted domain names and the manifest."""

    train: list[Document]
    val: list[Document]
    test: list[Document]
    manifest: dict[str, Any]
    domains: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Document]:
        return getattr(self, check_choice("split", name, SPLITS))


# --------------------------------------------------------------------------- helpers


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$MOELAB_CACHE``, else ``~/.cache/moelab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MOELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moelab"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha1_hex(*parts: str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def split_of(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one document: sha1(doc_id) -> bucket in [0, 1)."""
    bucket = int(hashlib.sha1(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:15], 16) / 16**15
    if bucket < val_fraction:
        return "val"
    if bucket < val_fraction + test_fraction:
        return "test"
    return "train"


def content_hash(docs: list[Document]) -> str:
    """sha1 over (doc_id, domain, text) of every document, in the given order."""
    h = hashlib.sha1()
    for d in docs:
        for part in (d.doc_id, d.domain, d.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()


def cap_per_domain(docs: list[Document], max_chars: int | None) -> list[Document]:
    """Keep whole documents per domain, greedily in a salted-hash order, while they fit in ``max_chars``.

    The order uses sha1("cap:" + doc_id), independent of the split hash, so a cap does not favour
    any split. The returned list keeps the input order.
    """
    if max_chars is None:
        return list(docs)
    order = sorted(range(len(docs)), key=lambda i: sha1_hex("cap", docs[i].doc_id))
    used: dict[str, int] = {}
    keep: set[int] = set()
    for i in order:
        d = docs[i]
        n = used.get(d.domain, 0)
        if n + len(d.text) <= max_chars:
            used[d.domain] = n + len(d.text)
            keep.add(i)
    return [d for i, d in enumerate(docs) if i in keep]


def _sizes(docs: list[Document]) -> dict[str, Any]:
    per: dict[str, dict[str, int]] = {}
    for d in docs:
        e = per.setdefault(d.domain, {"docs": 0, "chars": 0})
        e["docs"] += 1
        e["chars"] += len(d.text)
    return {
        "docs": len(docs),
        "chars": sum(e["chars"] for e in per.values()),
        "per_domain": dict(sorted(per.items())),
    }


def make_splits(docs: list[Document], cfg: DataConfig, source_info: dict[str, Any]) -> CorpusSplits:
    """Cap, split and describe ``docs`` (sorted by doc_id first, so the order never depends on the OS)."""
    docs = sorted(docs, key=lambda d: d.doc_id)
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise MoelabError(f"source={cfg.source!r} has duplicate document id {dup!r}")
    docs = [d for d in docs if d.text]
    if not docs:
        raise MoelabError(f"source={cfg.source!r} has no non-empty documents (0 characters of text)")
    docs = cap_per_domain(docs, cfg.max_chars_per_domain)
    parts: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        parts[split_of(d.doc_id, cfg.val_fraction, cfg.test_fraction)].append(d)
    all_sizes = _sizes(docs)
    manifest = {
        "format_version": CORPUS_FORMAT_VERSION,
        "source": cfg.source,
        **source_info,
        "docs_per_domain": {k: v["docs"] for k, v in all_sizes["per_domain"].items()},
        "chars_per_domain": {k: v["chars"] for k, v in all_sizes["per_domain"].items()},
        "total_docs": all_sizes["docs"],
        "total_chars": all_sizes["chars"],
        "content_hash": content_hash(docs),
        "max_chars_per_domain": cfg.max_chars_per_domain,
        "split": {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
                  "method": "sha1(doc_id) bucket"},
        "split_sizes": {s: _sizes(parts[s]) for s in SPLITS},
    }
    manifest["manifest_hash"] = sha1_hex(json.dumps(manifest, sort_keys=True))
    domains = sorted(manifest["docs_per_domain"])
    return CorpusSplits(train=parts["train"], val=parts["val"], test=parts["test"],
                        manifest=manifest, domains=domains)


# --------------------------------------------------------------------------- cache


def _cache_path(cfg: DataConfig, fingerprint: str) -> Path:
    relevant = {k: v for k, v in cfg.to_dict().items()
                if k in ("source", "text_field", "domain_field", "val_fraction", "test_fraction",
                         "max_chars_per_domain", "hf_split")}
    key = sha1_hex(str(CORPUS_FORMAT_VERSION), json.dumps(relevant, sort_keys=True), fingerprint)
    return default_cache_dir(cfg.cache_dir) / "corpus" / f"{key}.jsonl"


def _write_cache(path: Path, splits: CorpusSplits) -> None:
    lines = [json.dumps({"manifest": splits.manifest, "domains": splits.domains})]
    for s in SPLITS:
        for d in splits.split(s):
            lines.append(json.dumps({"s": s, "id": d.doc_id, "d": d.domain, "t": d.text}))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))


def _read_cache(path: Path) -> CorpusSplits | None:
    try:
        with open(path, encoding="utf-8", errors="surrogatepass") as f:
            head = json.loads(f.readline())
            parts: dict[str, list[Document]] = {s: [] for s in SPLITS}
            for line in f:
                r = json.loads(line)
                parts[r["s"]].append(Document(r["id"], r["t"], r["d"]))
    except (OSError, ValueError, KeyError):
        return None
    return CorpusSplits(train=parts["train"], val=parts["val"], test=parts["test"],
                        manifest=head["manifest"], domains=head["domains"])


def load_corpus(cfg: DataConfig | None = None, *, use_cache: bool = True) -> CorpusSplits:
    """Load (from the cache when possible) and split the corpus described by ``cfg``.

    The manifest (``splits.manifest``) is a JSON-able dict: source, python version (embedded), file
    counts per domain, docs/chars per domain, total chars, content hash, split sizes and
    ``manifest_hash``; it is identical across calls on the same data (no timestamps, no paths of
    the cache).
    """
    from moelab.data import sources

    cfg = cfg if cfg is not None else DataConfig()
    cfg.validate()
    fingerprint = sources.fingerprint(cfg)
    path = _cache_path(cfg, fingerprint)
    if use_cache and path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached
    docs, info = sources.read_documents(cfg)
    splits = make_splits(docs, cfg, info)
    if use_cache:
        _write_cache(path, splits)
    return splits


def python_version() -> str:
    return sys.version.split()[0]

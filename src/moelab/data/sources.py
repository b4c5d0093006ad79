"""Readers for the corpus sources: embedded stdlib corpus, text folders/files, JSONL, Hugging Face datasets.

Every reader returns ``(documents, info)``; ``info`` goes into the corpus manifest. ``fingerprint(cfg)``
is a cheap description of the source files (paths, sizes, mtimes) used as the corpus cache key, so a
changed file rebuilds the corpus.
"""

from __future__ import annotations

import json
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Any

from moelab.data.corpus import DataConfig, Document, python_version, sha1_hex
from moelab.errors import MoelabError

MAX_FILE_CHARS = 256_000
SINGLE_FILE_DOC_CHARS = 2_000
TEXT_SUFFIXES = (".txt", ".md")
_PRUNED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                "pydoc_data", "lib-dynload"}
_GENERATED_FILES = {"html/entities.py"}
SOURCE_KINDS = "'embedded', a folder of .txt/.md files, a text file, a .jsonl file, 'hf:<saved-folder-or-name>'"


def source_kind(cfg: DataConfig) -> str:
    """One of embedded, hf, jsonl, folder, file; raises for a path that does not exist."""
    s = cfg.source
    if s == "embedded":
        return "embedded"
    if s.startswith("hf:"):
        if len(s) == 3:
            raise MoelabError(f"source={s!r} is not valid; expected 'hf:<saved-folder-or-name>'")
        return "hf"
    p = Path(s).expanduser()
    if p.is_dir():
        return "folder"
    if p.is_file():
        return "jsonl" if p.suffix == ".jsonl" else "file"
    raise MoelabError(f"source={s!r} is not valid (no such file or folder); choose one of: {SOURCE_KINDS}")


def _stat_list(paths: list[Path], root: Path) -> str:
    rows = []
    for p in paths:
        st = p.stat()
        rows.append(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}")
    return sha1_hex(*rows)


def fingerprint(cfg: DataConfig) -> str:
    kind = source_kind(cfg)
    if kind == "embedded":
        root = stdlib_dir()
        files = _stdlib_files(root) + [root / "pydoc_data" / "topics.py"]
        return sha1_hex(python_version(), str(root), _stat_list(files, root))
    if kind == "hf":
        p = Path(cfg.source[3:]).expanduser()
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            return sha1_hex("hf-local", str(p.resolve()), _stat_list(files, p))
        return sha1_hex("hf-remote", cfg.source)
    p = Path(cfg.source).expanduser()
    if kind == "folder":
        return sha1_hex("folder", str(p.resolve()), _stat_list(_text_files(p), p))
    return sha1_hex(kind, str(p.resolve()), _stat_list([p], p.parent))


def read_documents(cfg: DataConfig) -> tuple[list[Document], dict[str, Any]]:
    kind = source_kind(cfg)
    reader = {"embedded": read_embedded, "folder": read_folder, "file": read_text_file,
              "jsonl": read_jsonl, "hf": read_hf}[kind]
    docs, info = reader(cfg)
    return docs, {"source_kind": kind, **info}


# --------------------------------------------------------------------------- embedded


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _PRUNED_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            p = Path(dirpath) / name
            if p.relative_to(root).as_posix() in _GENERATED_FILES:
                continue
            out.append(p)
    return out


def _read_py(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_embedded(cfg: DataConfig) -> tuple[list[Document], dict[str, Any]]:
    """stdlib .py files (domain "code") and pydoc topics (domain "prose"); see moelab.data.corpus."""
    root = stdlib_dir()
    docs: list[Document] = []
    skipped = {"generated": 0, "huge": 0}
    for p in _stdlib_files(root):
        text = _read_py(p)
        if "gencodec.py" in text[:1000]:
            skipped["generated"] += 1
            continue
        if len(text) > MAX_FILE_CHARS:
            skipped["huge"] += 1
            continue
        docs.append(Document(f"code/{p.relative_to(root).as_posix()}", text, "code"))
    n_code = len(docs)
    from pydoc_data.topics import topics  # the documentation prose shipped with every CPython

    for name in sorted(topics):
        docs.append(Document(f"prose/pydoc_topics/{name}", topics[name], "prose"))
    info = {
        "python_version": python_version(),
        "files_per_domain": {"code": n_code, "prose": 1},
        "topics_per_domain": {"prose": len(topics)},
        "skipped_files": skipped,
        "max_file_chars": MAX_FILE_CHARS,
    }
    return docs, info


# --------------------------------------------------------------------------- plain text


def _text_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_text_checked(path: Path, name: str, bad: dict[str, str]) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 become U+FFFD with a warning (and ``bad[name]``
    says how many and where, for the manifest), never silently."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        text = path.read_text(encoding="utf-8", errors="replace")
        bad[name] = f"{text.count(chr(0xFFFD))} U+FFFD replacements, first invalid byte at offset {e.start}"
        warnings.warn(f"{str(path)!r} is not valid UTF-8: {bad[name]} (the text keeps the replacement characters)",
                      UnicodeWarning, stacklevel=2)
        return text


def _bad_info(bad: dict[str, str]) -> dict[str, Any]:
    return {"non_utf8_files": dict(sorted(bad.items()))} if bad else {}


def read_folder(cfg: DataConfig) -> tuple[list[Document], dict[str, Any]]:
    """One document per .txt/.md file; domain = first sub-folder (files at the top: the folder name)."""
    root = Path(cfg.source).expanduser()
    files = _text_files(root)
    if not files:
        raise MoelabError(f"source={cfg.source!r} is a folder with no {'/'.join(TEXT_SUFFIXES)} files "
                          "(dataset is empty)")
    docs, per, bad = [], {}, {}
    for p in files:
        rel = p.relative_to(root)
        domain = rel.parts[0] if len(rel.parts) > 1 else root.resolve().name
        docs.append(Document(rel.as_posix(), read_text_checked(p, rel.as_posix(), bad), domain))
        per[domain] = per.get(domain, 0) + 1
    return docs, {"files_per_domain": dict(sorted(per.items())), **_bad_info(bad)}


def split_text(text: str, target_chars: int = SINGLE_FILE_DOC_CHARS) -> list[str]:
    """Cut ``text`` into chunks of about ``target_chars`` at blank lines (hard cut at 4x without one).

    Concatenating the chunks gives back ``text`` exactly.
    """
    chunks, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= target_chars and (not line.strip() or n >= 4 * target_chars):
            chunks.append("".join(cur))
            cur, n = [], 0
    if cur:
        chunks.append("".join(cur))
    return chunks


def read_text_file(cfg: DataConfig) -> tuple[list[Document], dict[str, Any]]:
    """A single text file, cut into ~2,000-character documents at blank lines; domain = file stem."""
    p = Path(cfg.source).expanduser()
    bad: dict[str, str] = {}
    text = read_text_checked(p, p.name, bad)
    if not text.strip():
        raise MoelabError(f"source={cfg.source!r} is an empty text file (0 characters; dataset is empty)")
    docs = [Document(f"{p.stem}/{i:07d}", chunk, p.stem) for i, chunk in enumerate(split_text(text))]
    return docs, {"files_per_domain": {p.stem: 1}, **_bad_info(bad)}


# --------------------------------------------------------------------------- JSONL


def _row_doc(row: Any, where: str, cfg: DataConfig, default_domain: str) -> Document | None:
    if not isinstance(row, dict) or cfg.text_field not in row:
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise MoelabError(f"text_field={cfg.text_field!r} is missing in {where}; fields there: {fields}")
    text = row[cfg.text_field]
    if not isinstance(text, str):
        raise MoelabError(f"text_field={cfg.text_field!r} in {where} is a {type(text).__name__}, "
                          "expected a string")
    domain = default_domain
    if cfg.domain_field is not None:
        if cfg.domain_field not in row:
            raise MoelabError(f"domain_field={cfg.domain_field!r} is missing in {where}; "
                              f"fields there: {sorted(row)}")
        domain = str(row[cfg.domain_field])
    return Document(where, text, domain)


def read_jsonl(cfg: DataConfig) -> tuple[list[Document], dict[str, Any]]:
    """One document per line of a .jsonl file (``text_field``; ``domain_field`` or the file stem)."""
    p = Path(cfg.source).expanduser()
    docs = []
    with open(p, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoelabError(f"source={cfg.source!r} line {i} is not valid UTF-8 (byte offset {e.start} "
                                  "of the line); JSON Lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoelabError(f"source={cfg.source!r} line {i} is not valid JSON: {e}") from None
            docs.append(_row_doc(row, f"{p.stem}:{i:09d}", cfg, p.stem))
    if not docs:
        raise MoelabError(f"source={cfg.source!r} has no rows (dataset is empty)")
    per: dict[str, int] = {}
    for d in docs:
        per[d.domain] = per.get(d.domain, 0) + 1
    return docs, {"files_per_domain": {k: 1 for k in sorted(per)}, "rows": len(docs)}


# --------------------------------------------------------------------------- Hugging Face


def read_hf(cfg: DataConfig) -> tuple[list[Document], dict[str, Any]]:
    """A Hugging Face dataset: ``datasets.load_from_disk`` for a saved folder, ``load_dataset(name)``
    only with ``hf_allow_download=True``. A DatasetDict contributes all its splits (or ``hf_split``);
    rows are re-split by hash of their id ``"<split>/<row>"``. Domain: ``domain_field`` or ``"hf"``+name.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is an optional dependency
        raise MoelabError(f"source={cfg.source!r} needs the 'datasets' package (pip install moelab[hf])") from None
    target = cfg.source[3:]
    p = Path(target).expanduser()
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    elif cfg.hf_allow_download:
        ds = datasets.load_dataset(target)
    else:
        raise MoelabError(f"source={cfg.source!r} is not a local folder saved with save_to_disk; set "
                          "hf_allow_download=True to call datasets.load_dataset (network)")
    if isinstance(ds, datasets.DatasetDict):
        names = sorted(ds)
        if cfg.hf_split is not None:
            from moelab.errors import check_choice

            names = [check_choice("hf_split", cfg.hf_split, names)]
        parts = [(n, ds[n]) for n in names]
    else:
        parts = [(cfg.hf_split or "all", ds)]
    default_domain = p.name if p.is_dir() else target.replace("/", "_")
    docs = []
    for name, part in parts:
        cols = part.column_names
        if cfg.text_field not in cols:
            raise MoelabError(f"text_field={cfg.text_field!r} is not a column of {cfg.source!r} "
                              f"split {name!r}; columns: {cols}")
        if cfg.domain_field is not None and cfg.domain_field not in cols:
            raise MoelabError(f"domain_field={cfg.domain_field!r} is not a column of {cfg.source!r} "
                              f"split {name!r}; columns: {cols}")
        texts = part[cfg.text_field]
        domains = part[cfg.domain_field] if cfg.domain_field is not None else [default_domain] * len(texts)
        for i, (t, dom) in enumerate(zip(texts, domains)):
            if not isinstance(t, str):
                raise MoelabError(f"text_field={cfg.text_field!r} in {cfg.source!r} row {name}/{i} is a "
                                  f"{type(t).__name__}, expected a string")
            docs.append(Document(f"{name}/{i:09d}", t, str(dom)))
    if not docs:
        raise MoelabError(f"source={cfg.source!r} has no rows (dataset is empty)")
    return docs, {"hf_splits": [n for n, _ in parts], "rows": len(docs)}

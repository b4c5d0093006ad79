"""Prompt features that need no download.

- :class:`TfidfSvdFeaturizer` (default): TF-IDF over word 1-2-grams and character 2-4-grams
  (scikit-learn), concatenated, reduced with truncated SVD, L2-normalised. Fitted on the training
  split only. Its state is plain arrays (vocabularies as JSON, matrices as safetensors): no pickle.
- :class:`LocalEmbeddingFeaturizer`: a sentence-transformers model or a model2vec-style static
  embedding folder (``tokenizer.json`` + ``model.safetensors`` holding ``embeddings``) from a local
  path; never downloads.

Features are cached per (featurizer fingerprint, texts) in memory, and on disk when a cache
directory is given. Shapes: P prompts, D feature dim.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from itertools import repeat
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError

_MEM_CACHE: dict[str, np.ndarray] = {}
_MEM_CACHE_MAX = 16


class threads:
    """Context manager limiting BLAS and torch intra-op threads to ``threads.n`` (default 1) while
    routing code fits or routes; restores the previous settings on exit.

    These problems are small, and on the shared 2-core machine extra threads mostly contend.
    Measured under load: a 1 x 128 @ 128 x 13,932 product took 40-65 ms with 2 OpenBLAS threads and
    0.7 ms with 1; a 556-prompt truncated SVD 16.7 s vs 3.6 s. The BLAS controller is created once
    (entering the context then costs ~0.02 ms). Benchmarks may set ``threads.n``."""

    n = 1
    _controller = None

    @classmethod
    def _libs(cls) -> list:
        """The BLAS/OpenMP libraries' controllers, found once per process (enumerating them on
        every call cost ~0.2 ms, a fifth of a one-prompt route)."""
        if cls._controller is None:
            from threadpoolctl import ThreadpoolController

            cls._controller = ThreadpoolController()
        return cls._controller.lib_controllers

    def __enter__(self):
        self._prev = []
        for lib in self._libs():
            n = lib.get_num_threads()
            self._prev.append(n)
            if n != self.n:
                lib.set_num_threads(self.n)
        # torch is touched only when something already imported it (numpy routers never do)
        self._t = sys.modules.get("torch")
        self._torch = self._t.get_num_threads() if self._t is not None else None
        if self._t is not None and self._torch != self.n:
            self._t.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        for lib, n in zip(self._libs(), self._prev):
            if n != self.n:
                lib.set_num_threads(n)
        if self._t is not None and self._t.get_num_threads() != self._torch:
            self._t.set_num_threads(self._torch)


def _texts_key(texts: list[str]) -> str:
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class Featurizer:
    kind = "base"

    def fit(self, texts: list[str]) -> "Featurizer":
        return self

    def _transform(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def transform(self, texts: list[str], cache_dir: str | Path | None = None) -> np.ndarray:
        """Features ``x_PD`` (float32) for ``texts``; cached."""
        for i, t in enumerate(texts):
            if not t:
                raise MoelabError(f"texts[{i}] is empty; a text-feature router needs the prompt text")
        key = f"{self.fingerprint()}-{_texts_key(texts)}"
        path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
        if key in _MEM_CACHE:
            if path is not None and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, _MEM_CACHE[key])
            return _MEM_CACHE[key]
        if path is not None and path.exists():
            x_PD = np.load(path, allow_pickle=False)
        else:
            with threads():
                x_PD = self._transform(texts).astype(np.float32)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, x_PD)
        if len(texts) > 1:  # do not fill the cache with single-prompt routing calls
            if len(_MEM_CACHE) >= _MEM_CACHE_MAX:
                _MEM_CACHE.pop(next(iter(_MEM_CACHE)))
            _MEM_CACHE[key] = x_PD
        return x_PD

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        raise NotImplementedError


_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default token_pattern


def word_ngrams(text: str) -> list[str]:
    """sklearn ``TfidfVectorizer(analyzer='word', ngram_range=(1, 2))``'s analyzer (lowercase,
    default token pattern), reimplemented so routing needs no sklearn import; checked in the tests."""
    toks = _TOKEN_RE.findall(text.lower())
    return toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]


def char_wb_ngrams(text: str, lo: int = 2, hi: int = 4) -> list[str]:
    """sklearn's ``analyzer='char_wb'`` n-grams (each word padded with spaces; a word shorter
    than n is counted once), reimplemented as above."""
    out: list[str] = []
    for w in text.lower().split():
        w = f" {w} "
        for n in range(lo, hi + 1):
            if len(w) <= n:
                out.append(w)
                break
            out.extend(w[i:i + n] for i in range(len(w) - n + 1))
    return out


def _counts(grams: list[str], vocab: dict) -> tuple[np.ndarray, np.ndarray]:
    """(vocabulary ids, counts) of the in-vocabulary grams (Counter and map run in C)."""
    cnt = Counter(grams)
    ids = np.fromiter(map(vocab.get, cnt.keys(), repeat(-1)), np.int64, len(cnt))
    val = np.fromiter(cnt.values(), np.float64, len(cnt))
    keep = ids >= 0
    return ids[keep], val[keep]


def _tfidf_row(text: str, parts) -> tuple[np.ndarray, np.ndarray]:
    """One text's non-zero TF-IDF entries over the concatenated (word, char) vocabularies:
    sklearn's sublinear_tf=True, norm='l2' per part, i.e. (1 + log tf) * idf, L2-normalised."""
    idx_all, val_all = [], []
    for analyzer, vocab, idf_V, offset in parts:
        idx, cnt = _counts(analyzer(text), vocab)
        val = (1.0 + np.log(cnt)) * idf_V[idx]
        nrm = np.sqrt((val * val).sum())
        idx_all.append(idx + offset)
        val_all.append(val / nrm if nrm > 0 else val)
    return np.concatenate(idx_all), np.concatenate(val_all)


class TfidfSvdFeaturizer(Featurizer):
    """TF-IDF (word + char n-grams) → truncated SVD → L2 normalise. Fit on training texts only."""

    kind = "tfidf-svd"

    def __init__(self, dim: int = 128, max_features: int = 20000, seed: int = 0) -> None:
        self.dim, self.max_features, self.seed = dim, max_features, seed
        self.components_DV: np.ndarray | None = None
        self._fp: str | None = None

    def _make_vecs(self, vocab_w=None, vocab_c=None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        w = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), max_features=self.max_features,
                            sublinear_tf=True, min_df=2 if vocab_w is None else 1, vocabulary=vocab_w,
                            dtype=np.float32)
        c = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), max_features=self.max_features,
                            sublinear_tf=True, min_df=2 if vocab_c is None else 1, vocabulary=vocab_c,
                            dtype=np.float32)
        return w, c

    def fit(self, texts: list[str]) -> "TfidfSvdFeaturizer":
        import scipy.sparse as sp
        from sklearn.decomposition import TruncatedSVD

        if len(texts) < 3:
            raise MoelabError(f"TF-IDF featurizer needs at least 3 training texts; got {len(texts)}")
        w, c = self._make_vecs()
        try:
            xw, xc = w.fit_transform(texts), c.fit_transform(texts)
        except ValueError:  # min_df=2 may empty the vocabulary on tiny corpora
            w.min_df = c.min_df = 1
            xw, xc = w.fit_transform(texts), c.fit_transform(texts)
        x = sp.hstack([xw, xc]).tocsr()
        k = max(1, min(self.dim, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=k, random_state=self.seed, algorithm="randomized", n_iter=3)
        with threads():
            svd.fit(x)
        self._set(dict(w.vocabulary_), dict(c.vocabulary_), w.idf_, c.idf_, svd.components_)
        return self

    def _set(self, vocab_w: dict, vocab_c: dict, idf_w, idf_c, components_DV) -> None:
        """The fitted state (all that transform needs: no sklearn objects)."""
        self.vocab_w = {k: int(v) for k, v in vocab_w.items()}
        self.vocab_c = {k: int(v) for k, v in vocab_c.items()}
        self.idf_w = np.asarray(idf_w, np.float64)
        self.idf_c = np.asarray(idf_c, np.float64)
        self.components_DV = np.ascontiguousarray(components_DV, dtype=np.float32)
        self._comp_VD = np.ascontiguousarray(self.components_DV.T)
        self._parts = [(word_ngrams, self.vocab_w, self.idf_w, 0),
                       (char_wb_ngrams, self.vocab_c, self.idf_c, len(self.idf_w))]
        self._fp = None

    def _transform(self, texts: list[str]) -> np.ndarray:
        if self.components_DV is None:
            raise MoelabError("TfidfSvdFeaturizer is not fitted; call fit(train_texts) first")
        z_PD = np.zeros((len(texts), self._comp_VD.shape[1]), np.float64)
        if len(texts) <= 32:  # serving path: dense gather of the touched SVD rows, no scipy
            for i, t in enumerate(texts):
                idx, val = _tfidf_row(t, self._parts)
                z_PD[i] = val @ self._comp_VD[idx]
        else:
            import scipy.sparse as sp

            rows = [_tfidf_row(t, self._parts) for t in texts]
            indptr = np.cumsum([0] + [len(r[0]) for r in rows])
            cat = lambda k, dt: np.concatenate([r[k] for r in rows]).astype(dt) if rows else np.zeros(0, dt)  # noqa: E731
            x = sp.csr_matrix((cat(1, np.float32), cat(0, np.int64), indptr), shape=(len(texts), len(self._comp_VD)))
            z_PD = np.asarray(x @ self._comp_VD, np.float64)
        z_PD /= np.linalg.norm(z_PD, axis=1, keepdims=True) + 1e-8
        return z_PD

    def fingerprint(self) -> str:
        """Hash of the fitted projection, computed once per fit/load (hashing the SVD matrix took
        ~13 ms, which dominated one-prompt routing when it ran on every transform)."""
        if self.components_DV is None:
            raise MoelabError("TfidfSvdFeaturizer is not fitted; call fit(train_texts) first")
        if self._fp is None:
            self._fp = "tfidf-" + hashlib.sha1(self.components_DV.tobytes()).hexdigest()[:16]
        return self._fp

    def state(self):
        if self.components_DV is None:
            raise MoelabError("TfidfSvdFeaturizer is not fitted; nothing to save")
        meta = {"kind": self.kind, "dim": self.dim, "max_features": self.max_features, "seed": self.seed,
                "vocab_word": self.vocab_w, "vocab_char": self.vocab_c}
        return meta, {"feat.idf_word": self.idf_w.astype(np.float32), "feat.idf_char": self.idf_c.astype(np.float32),
                      "feat.components_DV": self.components_DV}

    def fit_cached(self, texts: list[str], cache_dir: str | Path | None) -> "TfidfSvdFeaturizer":
        """``fit``, reusing a featurizer fitted earlier on the same texts and settings."""
        if cache_dir is None:
            return self.fit(texts)
        from safetensors.numpy import load_file, save_file

        key = f"tfidf-fit-{self.dim}-{self.max_features}-{self.seed}-{_texts_key(texts)[:20]}"
        jp, tp = Path(cache_dir) / f"{key}.json", Path(cache_dir) / f"{key}.safetensors"
        if jp.exists() and tp.exists():
            f = TfidfSvdFeaturizer.from_state(json.loads(jp.read_text()), load_file(str(tp)))
            self.__dict__.update(f.__dict__)
            return self
        self.fit(texts)
        meta, t = self.state()
        t = {k: np.ascontiguousarray(v) for k, v in t.items()}
        jp.parent.mkdir(parents=True, exist_ok=True)
        save_file(t, str(tp))
        jp.write_text(json.dumps(meta))
        return self

    @classmethod
    def from_state(cls, meta: dict, tensors: dict) -> "TfidfSvdFeaturizer":
        """The saved vocabularies, idf and SVD projection reproduce the fitted transform exactly."""
        f = cls(meta["dim"], meta["max_features"], meta["seed"])
        f._set(meta["vocab_word"], meta["vocab_char"], tensors["feat.idf_word"], tensors["feat.idf_char"],
               tensors["feat.components_DV"])
        return f


class LocalEmbeddingFeaturizer(Featurizer):
    """Embeddings from a local folder: sentence-transformers if installed and the folder is a
    sentence-transformers model, else a model2vec-style static model (``tokenizer.json`` +
    ``model.safetensors`` with an ``embeddings`` [V, D] tensor): mean of token vectors, L2-normed.
    No fitting; nothing is downloaded."""

    kind = "local"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MoelabError(f"embedding model path={str(self.path)!r} is not a local folder")
        self._st = None
        self._tok = None
        self._emb_VD = None
        if (self.path / "modules.json").exists():
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise MoelabError(
                    f"{self.path} is a sentence-transformers model but sentence-transformers is not installed"
                ) from None
            self._st = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        elif (self.path / "tokenizer.json").exists() and (self.path / "model.safetensors").exists():
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            t = load_file(str(self.path / "model.safetensors"))
            key = "embeddings" if "embeddings" in t else next(iter(t))
            self._emb_VD = t[key].astype(np.float32)
        else:
            raise MoelabError(
                f"{self.path} holds neither a sentence-transformers model (modules.json) nor a model2vec "
                "folder (tokenizer.json + model.safetensors)"
            )

    def _transform(self, texts: list[str]) -> np.ndarray:
        if self._st is not None:
            return np.asarray(self._st.encode(texts, normalize_embeddings=True, show_progress_bar=False))
        out = np.zeros((len(texts), self._emb_VD.shape[1]), np.float32)
        for i, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = [j for j in enc.ids if j < len(self._emb_VD)]
            if ids:
                out[i] = self._emb_VD[ids].mean(0)
        out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-8
        return out

    def fingerprint(self) -> str:
        """Path plus the files' names, sizes and mtimes, computed once (the folder is read-only
        for the featurizer's lifetime)."""
        if getattr(self, "_fp", None) is None:
            h = hashlib.sha1(str(self.path.resolve()).encode())
            for f in sorted(self.path.rglob("*")):
                if f.is_file():
                    h.update(f"{f.relative_to(self.path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
            self._fp = "local-" + h.hexdigest()[:16]
        return self._fp

    def state(self):
        return {"kind": self.kind, "path": str(self.path.resolve())}, {}


def featurizer_from_state(meta: dict, tensors: dict) -> Featurizer:
    if meta["kind"] == "tfidf-svd":
        return TfidfSvdFeaturizer.from_state(meta, tensors)
    if meta["kind"] == "local":
        return LocalEmbeddingFeaturizer(meta["path"])
    raise MoelabError(f"featurizer kind={meta['kind']!r} is unknown; expected 'tfidf-svd' or 'local'")


def default_cache_dir() -> Path:
    """$MOELAB_CACHE/route, else ~/.cache/moelab/route."""
    import os

    base = os.environ.get("MOELAB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "moelab") / "route"

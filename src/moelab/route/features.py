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
import sys
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

    def __enter__(self):
        if threads._controller is None:
            from threadpoolctl import ThreadpoolController

            threads._controller = ThreadpoolController()
        # torch is touched only when something already imported it (numpy routers never do)
        self._t = sys.modules.get("torch")
        self._torch = self._t.get_num_threads() if self._t is not None else None
        if self._t is not None and self._torch != self.n:
            self._t.set_num_threads(self.n)
        self._lim = threads._controller.limit(limits=self.n)
        return self

    def __exit__(self, *exc):
        self._lim.restore_original_limits()
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


def _tfidf_rows(analyzer, vocab: dict, idf_V: np.ndarray, texts: list[str]):
    """sklearn's TfidfVectorizer(sublinear_tf=True, norm='l2').transform without its per-call
    validation overhead (~20-30 ms per call, which dominated one-prompt routing):
    (1 + log tf) * idf, then L2-normalised rows. Checked against sklearn in the tests."""
    import scipy.sparse as sp

    indptr, indices, data = [0], [], []
    for t in texts:
        counts: dict[int, int] = {}
        for tok in analyzer(t):
            j = vocab.get(tok)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        idx = np.fromiter(counts.keys(), np.int64, len(counts))
        val = (1.0 + np.log(np.fromiter(counts.values(), np.float64, len(counts)))) * idf_V[idx]
        nrm = np.sqrt((val * val).sum())
        if nrm > 0:
            val /= nrm
        order = np.argsort(idx)
        indices.append(idx[order])
        data.append(val[order])
        indptr.append(indptr[-1] + len(idx))
    cat = lambda z, dt: np.concatenate(z).astype(dt) if z else np.zeros(0, dt)  # noqa: E731
    return sp.csr_matrix((cat(data, np.float32), cat(indices, np.int64), np.array(indptr)),
                         shape=(len(texts), len(idf_V)))


class TfidfSvdFeaturizer(Featurizer):
    """TF-IDF (word + char n-grams) → truncated SVD → L2 normalise. Fit on training texts only."""

    kind = "tfidf-svd"

    def __init__(self, dim: int = 128, max_features: int = 20000, seed: int = 0) -> None:
        self.dim, self.max_features, self.seed = dim, max_features, seed
        self._vecs = None
        self.components_DV: np.ndarray | None = None

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
        self._vecs = (w, c)
        self._fast = None
        x = sp.hstack([xw, xc]).tocsr()
        k = max(1, min(self.dim, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=k, random_state=self.seed, algorithm="randomized", n_iter=3)
        with threads():
            svd.fit(x)
        self.components_DV = np.ascontiguousarray(svd.components_, dtype=np.float32)
        self._comp_VD = None
        return self

    def _transform(self, texts: list[str]) -> np.ndarray:
        import scipy.sparse as sp

        if self._vecs is None:
            raise MoelabError("TfidfSvdFeaturizer is not fitted; call fit(train_texts) first")
        if getattr(self, "_fast", None) is None:
            self._fast = [(v.build_analyzer(), v.vocabulary_, v.idf_.astype(np.float64)) for v in self._vecs]
        x = sp.hstack([_tfidf_rows(a, voc, idf, texts) for a, voc, idf in self._fast]).tocsr()
        if getattr(self, "_comp_VD", None) is None or self._comp_VD.shape[1] != self.components_DV.shape[0]:
            self._comp_VD = np.ascontiguousarray(self.components_DV.T)  # scipy would copy a .T view per call
        z_PD = np.asarray(x @ self._comp_VD)
        z_PD /= np.linalg.norm(z_PD, axis=1, keepdims=True) + 1e-8
        return z_PD

    def fingerprint(self) -> str:
        if self.components_DV is None:
            raise MoelabError("TfidfSvdFeaturizer is not fitted; call fit(train_texts) first")
        return "tfidf-" + hashlib.sha1(self.components_DV.tobytes()).hexdigest()[:16]

    def state(self):
        w, c = self._vecs
        meta = {"kind": self.kind, "dim": self.dim, "max_features": self.max_features, "seed": self.seed,
                "vocab_word": {k: int(v) for k, v in w.vocabulary_.items()},
                "vocab_char": {k: int(v) for k, v in c.vocabulary_.items()}}
        return meta, {"feat.idf_word": w.idf_.astype(np.float32), "feat.idf_char": c.idf_.astype(np.float32),
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
        f = cls(meta["dim"], meta["max_features"], meta["seed"])
        w, c = f._make_vecs(meta["vocab_word"], meta["vocab_char"])
        # A fixed vocabulary plus the saved idf reproduce the fitted transform exactly.
        w.fit(["x"]), c.fit(["x"])
        w.idf_ = tensors["feat.idf_word"].astype(np.float64)
        c.idf_ = tensors["feat.idf_char"].astype(np.float64)
        f._vecs = (w, c)
        f._fast = None
        f.components_DV = tensors["feat.components_DV"]
        f._comp_VD = None
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
        h = hashlib.sha1(str(self.path.resolve()).encode())
        for f in sorted(self.path.glob("*")):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        return "local-" + h.hexdigest()[:16]

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

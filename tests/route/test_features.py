"""Prompt features: TF-IDF+SVD round trip and cache; local model2vec-style folder."""

import json

import numpy as np
import pytest

from moelab.errors import MoelabError
from moelab.route.features import LocalEmbeddingFeaturizer, TfidfSvdFeaturizer, featurizer_from_state

TEXTS = [f"question {i} about {'algebra' if i % 2 else 'poetry'} and word{i % 7}" for i in range(60)]


def test_tfidf_state_round_trip_and_cache(tmp_path):
    f = TfidfSvdFeaturizer(dim=8).fit(TEXTS)
    x = f.transform(TEXTS[:10])
    assert x.shape == (10, 8)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-4)
    meta, t = f.state()
    g = featurizer_from_state(json.loads(json.dumps(meta)), t)
    np.testing.assert_allclose(g._transform(TEXTS[:10]), x, atol=1e-5)
    y = f.transform(TEXTS[:10], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    np.testing.assert_array_equal(y, x)
    h = TfidfSvdFeaturizer(dim=8).fit_cached(TEXTS, tmp_path)
    h2 = TfidfSvdFeaturizer(dim=8).fit_cached(TEXTS, tmp_path)  # loaded from the cache
    np.testing.assert_allclose(h2._transform(TEXTS[:5]), h._transform(TEXTS[:5]), atol=1e-6)


def _sklearn_reference(f, texts):
    """sklearn's own TfidfVectorizer with the featurizer's vocabularies and idf (the oracle)."""
    import scipy.sparse as sp

    w, c = f._make_vecs(f.vocab_w, f.vocab_c)
    w.fit(["x"]), c.fit(["x"])
    w.idf_, c.idf_ = f.idf_w, f.idf_c
    ref = sp.hstack([w.transform(texts), c.transform(texts)]).toarray() @ f.components_DV.T.astype(np.float64)
    return ref / (np.linalg.norm(ref, axis=1, keepdims=True) + 1e-8)


def test_fast_tfidf_matches_sklearn():
    f = TfidfSvdFeaturizer(dim=8).fit(TEXTS)
    new = ["unseen words only zzz", "question about algebra algebra", TEXTS[3], "a  b\tI\n x"]
    np.testing.assert_allclose(f._transform(new), _sklearn_reference(f, new), atol=1e-5)
    many = [f"{t} {i}" for i, t in enumerate(TEXTS)]  # > 32 texts: the sparse path
    np.testing.assert_allclose(f._transform(many), _sklearn_reference(f, many), atol=1e-5)


@pytest.mark.parametrize("text", ["Hello, World! It's 2+2=4?", "a", "I am  ok\t\nyes", "Ünïcödé straße",
                                  "ab abc abcd abcde", "x_y __init__ 3.14"])
def test_analyzers_match_sklearn(text):
    from sklearn.feature_extraction.text import TfidfVectorizer

    from moelab.route.features import char_wb_ngrams, word_ngrams

    w = TfidfVectorizer(analyzer="word", ngram_range=(1, 2)).build_analyzer()
    c = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4)).build_analyzer()
    assert word_ngrams(text) == w(text)
    assert sorted(char_wb_ngrams(text)) == sorted(c(text))


def test_fingerprint_is_computed_once_per_fit():
    f = TfidfSvdFeaturizer(dim=8).fit(TEXTS)
    fp = f.fingerprint()
    f.components_DV = f.components_DV * 2  # a stale cache would not notice a refit; a refit resets it
    assert f.fingerprint() == fp
    g = TfidfSvdFeaturizer(dim=8, seed=1).fit(TEXTS[::-1])
    assert f.fit(TEXTS[:30]).fingerprint() != fp and g.fingerprint() != fp


def test_empty_text_is_rejected():
    f = TfidfSvdFeaturizer(dim=4).fit(TEXTS)
    with pytest.raises(MoelabError, match="texts\\[1\\] is empty"):
        f.transform(["ok", ""])


def test_model2vec_style_folder(tmp_path):
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "algebra": 1, "poetry": 2, "question": 3, "about": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    emb = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    save_file({"embeddings": emb}, str(tmp_path / "model.safetensors"))
    f = LocalEmbeddingFeaturizer(tmp_path)
    x = f.transform(["question about algebra", "poetry"])
    ref0 = emb[[3, 4, 1]].mean(0)
    np.testing.assert_allclose(x[0], ref0 / np.linalg.norm(ref0), rtol=1e-5)
    np.testing.assert_allclose(x[1], emb[2] / np.linalg.norm(emb[2]), rtol=1e-5)
    meta, _ = f.state()
    np.testing.assert_allclose(featurizer_from_state(meta, {}).transform(["poetry"]), x[1:], rtol=1e-6)


def _tiny_sentence_transformer(folder):
    """A 1-layer, 8-dim BERT with a 12-word vocabulary and mean pooling, saved as a
    sentence-transformers folder (random weights: built offline by the test)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "algebra", "poetry", "question", "about", "the", "a", "why"]
    (folder / "bert").mkdir(parents=True)
    (folder / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(str(folder / "bert" / "vocab.txt")).save_pretrained(str(folder / "bert"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(str(folder / "bert"))
    tr = models.Transformer(str(folder / "bert"), max_seq_length=32)
    st = SentenceTransformer(modules=[tr, models.Pooling(8, pooling_mode="mean")], device="cpu")
    st.save(str(folder / "st"))
    return folder / "st", folder / "bert"


def test_sentence_transformers_folder_when_installed(tmp_path):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (extra 'embed')")
    import torch
    from transformers import BertModel, BertTokenizerFast

    st_dir, bert_dir = _tiny_sentence_transformer(tmp_path)
    f = LocalEmbeddingFeaturizer(st_dir)
    texts = ["algebra question", "why the poetry about a question"]
    x = f.transform(texts)
    tok, model = BertTokenizerFast.from_pretrained(str(bert_dir)), BertModel.from_pretrained(str(bert_dir)).eval()
    for i, t in enumerate(texts):  # oracle: BERT forward + masked mean pooling + L2 norm, by hand
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        ref = h.mean(0).numpy()
        np.testing.assert_allclose(x[i], ref / np.linalg.norm(ref), rtol=1e-4, atol=1e-5)
    assert f.fingerprint() == f.fingerprint() and f.fingerprint().startswith("local-")


def test_any_router_can_use_a_local_embedding_model(tmp_path, capsys):
    """CLI: fit with --embedding-model (a model2vec-style folder the test builds), then predict."""
    import json as _json

    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moelab.cli.main import main
    from moelab.route.synthetic import TOPICS, topic_dataset

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(TOPICS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    emb_dir = tmp_path / "m2v"
    emb_dir.mkdir()
    tok.save(str(emb_dir / "tokenizer.json"))
    save_file({"embeddings": np.eye(len(vocab), dtype=np.float32)[:, :8]}, str(emb_dir / "model.safetensors"))
    ds = topic_dataset(n=200, n_models=2, n_topics=2, seed=5)
    rows = [{"prompt_id": p, "model": m, "score": float(ds.scores_PM[i, j]), "cost": float(ds.costs_PM[i, j]),
             "prompt": ds.texts[i]} for i, p in enumerate(ds.prompt_ids) for j, m in enumerate(ds.models)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(_json.dumps(r) for r in rows))
    for router in ("knn", "sw-ranking"):
        assert main(["route", "fit", router, "--data", str(data), "--out", str(tmp_path / router),
                     "--embedding-model", str(emb_dir), "--no-tune"]) == 0
        doc = _json.loads((tmp_path / router / "router.json").read_text())
        assert doc["featurizer"]["kind"] == "local"
        capsys.readouterr()
        assert main(["route", "predict", str(tmp_path / router), "--prompt", "algebra", "--tradeoff", "0"]) == 0
        assert _json.loads(capsys.readouterr().out)["model"] == "model0"  # model0 is the algebra model


def test_local_featurizer_rejects_bad_folder(tmp_path):
    with pytest.raises(MoelabError, match="neither a sentence-transformers"):
        LocalEmbeddingFeaturizer(tmp_path)

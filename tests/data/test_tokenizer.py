import pytest
from hypothesis import given, settings, strategies as st

from moelab.data import Tokenizer, train_tokenizer
from moelab.data.tokenizer import EOS
from moelab.errors import MoelabError

TRICKY = ["", "a", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "ünïcödé 漢字 😀",
          f"text with {EOS} inside", "\x00\x01 control", "def f(x):\n    return x ** 2\n"]


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip_is_exact(text):
    tok = train_tokenizer([], "byte")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8", "surrogatepass"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_ids():
    tok = Tokenizer("byte")
    assert tok.vocab_size == 259
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (256, 257, 258)
    assert tok.decode([104, 105, tok.eos_id]) == "hi" + EOS
    with pytest.raises(MoelabError, match="id=999"):
        tok.decode([999])


def test_bpe_round_trip_on_corpus_and_tricky_text(small_bpe, small_splits):
    for d in small_splits.val[:20]:
        assert small_bpe.decode(small_bpe.encode(d.text)) == d.text
    for t in TRICKY:
        assert small_bpe.decode(small_bpe.encode(t)) == t


def test_bpe_specials_and_size(small_bpe, small_cfg):
    assert small_bpe.vocab_size <= small_cfg.vocab_size
    assert len({small_bpe.eos_id, small_bpe.bos_id, small_bpe.pad_id}) == 3
    assert small_bpe.eos_id not in small_bpe.encode(f"a {EOS} b")


def test_bpe_compresses(small_bpe, small_splits):
    text = "".join(d.text for d in small_splits.val)
    assert len(small_bpe.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_bpe_training_is_deterministic(small_splits):
    a = train_tokenizer(small_splits.train, "bpe", 400, max_train_chars=50_000, use_cache=False)
    b = train_tokenizer(small_splits.train[::-1], "bpe", 400, max_train_chars=50_000, use_cache=False)
    assert a.to_str() == b.to_str()


def test_bpe_cache_hit(small_splits, tmp_path):
    a = train_tokenizer(small_splits.train, "bpe", 400, max_train_chars=50_000, cache_dir=tmp_path)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1
    b = train_tokenizer(small_splits.train, "bpe", 400, max_train_chars=50_000, cache_dir=tmp_path)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_save_load_round_trip(kind, small_bpe, tmp_path):
    tok = small_bpe if kind == "bpe" else Tokenizer("byte")
    tok.save(tmp_path / "tokenizer.json")
    back = Tokenizer.load(tmp_path)
    assert back.kind == kind and back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
    for t in TRICKY:
        assert back.encode(t) == tok.encode(t)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(MoelabError, match="kind='wordpiece'.*'bpe'"):
        train_tokenizer([], "wordpiece")
    with pytest.raises(MoelabError, match="0 characters"):
        train_tokenizer([], "bpe", 512)
    with pytest.raises(MoelabError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)

import json

from moelab.data import DataConfig, prepare_data


def test_prepare_data_is_cached_and_reports_tokens(tmp_path):
    cfg = DataConfig(max_chars_per_domain=60_000, vocab_size=500, tokenizer_train_chars=60_000,
                     cache_dir=str(tmp_path))
    a = prepare_data(cfg)
    b = prepare_data(cfg)
    assert a.manifest == b.manifest and json.loads(json.dumps(a.manifest)) == a.manifest
    assert a.tokenizer.fingerprint == b.tokenizer.fingerprint
    tps = a.manifest["tokens_per_split"]
    for s in ("train", "val", "test"):
        assert tps[s]["total"] == len(a.tokens[s].tokens) == sum(tps[s]["per_domain"].values())
    assert set(tps["train"]["per_domain"]) == {"code", "prose"}
    assert a.manifest["tokenizer"]["vocab_size"] == a.tokenizer.vocab_size <= 500
    assert {p.name for p in tmp_path.iterdir()} == {"corpus", "tokenizers", "tokens"}


def test_byte_tokenizer_pipeline(tmp_path):
    p = prepare_data(DataConfig(max_chars_per_domain=20_000, tokenizer="byte", cache_dir=str(tmp_path)))
    assert p.tokenizer.vocab_size == 259
    assert p.manifest["tokens_per_split"]["train"]["total"] == sum(
        len(d.text.encode("utf-8", "surrogatepass")) for d in p.splits.train)


def test_empty_val_split_is_a_clear_error(tmp_path):
    import pytest

    from moelab.errors import MoelabError

    f = tmp_path / "few.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(3)))
    with pytest.raises(MoelabError, match=r"val split has 0 documents \(val_fraction=0.05 of 3"):
        prepare_data(DataConfig(source=str(f), tokenizer="byte", cache_dir=str(tmp_path / "c")))
    p = prepare_data(DataConfig(source=str(f), tokenizer="byte", val_fraction=0.0, test_fraction=0.0,
                                cache_dir=str(tmp_path / "c")))
    assert len(p.splits.train) == 3

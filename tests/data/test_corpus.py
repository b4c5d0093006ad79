import dataclasses
import json
import os

import pytest

from moelab.data import DataConfig, load_corpus
from moelab.data.corpus import split_of
from moelab.errors import MoelabError


def test_split_is_deterministic_and_close_to_fractions():
    ids = [f"doc/{i}" for i in range(20_000)]
    first = [split_of(i, 0.05, 0.1) for i in ids]
    assert first == [split_of(i, 0.05, 0.1) for i in ids]
    frac = {s: first.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(frac["val"] - 0.05) < 0.01 and abs(frac["test"] - 0.1) < 0.01


def test_splits_are_disjoint_and_cover_the_corpus(small_splits):
    ids = {s: {d.doc_id for d in small_splits.split(s)} for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    total = sum(len(v) for v in ids.values())
    assert total == small_splits.manifest["total_docs"]
    for s in ("train", "val", "test"):
        assert small_splits.manifest["split_sizes"][s]["docs"] == len(ids[s])
        assert small_splits.manifest["split_sizes"][s]["chars"] == sum(len(d.text) for d in small_splits.split(s))


def test_embedded_has_code_and_prose_labels_and_no_tests():
    splits = load_corpus(DataConfig())
    assert splits.domains == ["code", "prose"]
    docs = splits.train + splits.val + splits.test
    assert {d.domain for d in splits.train} == {"code", "prose"}
    assert all(d.domain in ("code", "prose") for d in docs)
    code_ids = [d.doc_id for d in docs if d.domain == "code"]
    for bad in ("/test/", "/tests/", "idle_test", "site-packages", "pydoc_data", "encodings/cp1252.py"):
        assert not any(bad in i for i in code_ids), bad
    assert any(i == "code/collections/__init__.py" for i in code_ids)
    m = splits.manifest
    assert m["chars_per_domain"]["code"] > m["chars_per_domain"]["prose"] > 0
    assert m["python_version"] and m["files_per_domain"]["code"] > 100
    assert len(splits.val) > 0 and len(splits.test) > 0


def test_split_of_a_document_does_not_depend_on_the_cap(small_splits):
    full = load_corpus(DataConfig())
    where = {d.doc_id: s for s in ("train", "val", "test") for d in full.split(s)}
    for s in ("train", "val", "test"):
        assert all(where[d.doc_id] == s for d in small_splits.split(s))


def test_cap_limits_chars_per_domain(small_splits, small_cfg):
    for dom, n in small_splits.manifest["chars_per_domain"].items():
        assert 0.5 * small_cfg.max_chars_per_domain < n <= small_cfg.max_chars_per_domain


def test_manifest_is_stable_and_cache_hit_returns_same_data(tmp_path):
    cfg = DataConfig(max_chars_per_domain=50_000, cache_dir=str(tmp_path))
    fresh1 = load_corpus(cfg, use_cache=False)
    fresh2 = load_corpus(cfg, use_cache=False)
    assert fresh1.manifest == fresh2.manifest
    built = load_corpus(cfg)
    files = list((tmp_path / "corpus").iterdir())
    assert len(files) == 1 and not any(f.name.endswith(".tmp") for f in files)
    hit = load_corpus(cfg)
    assert hit.manifest == built.manifest == fresh1.manifest
    assert hit.train == fresh1.train and hit.val == fresh1.val and hit.test == fresh1.test
    assert json.loads(json.dumps(hit.manifest)) == hit.manifest


def test_cache_dir_env_and_explicit(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "env"))
    load_corpus(DataConfig(max_chars_per_domain=10_000))
    assert (tmp_path / "env" / "corpus").is_dir()
    load_corpus(DataConfig(max_chars_per_domain=10_000, cache_dir=str(tmp_path / "explicit")))
    assert (tmp_path / "explicit" / "corpus").is_dir()


def test_config_split_fractions_change_split_sizes():
    a = load_corpus(DataConfig(max_chars_per_domain=100_000, val_fraction=0.2, test_fraction=0.0))
    assert len(a.test) == 0 and len(a.val) > 0


@pytest.mark.parametrize("field,value,needle", [
    ("tokenizer", "wordpiece", "'bpe'"),
    ("val_fraction", 1.5, "val_fraction"),
    ("test_fraction", -0.1, "test_fraction"),
    ("vocab_size", 10, "vocab_size"),
    ("seq_len", 0, "seq_len"),
    ("max_chars_per_domain", 0, "max_chars_per_domain"),
])
def test_bad_config_values_name_parameter_and_choices(field, value, needle):
    with pytest.raises(MoelabError, match=needle) as e:
        DataConfig(**{field: value})
    assert field in str(e.value)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(MoelabError, match="source=.*no such file.*embedded"):
        load_corpus(DataConfig(source=str(tmp_path / "nope"), cache_dir=str(tmp_path)))


def test_config_is_a_kw_only_dataclass():
    with pytest.raises(TypeError):
        DataConfig("embedded")  # noqa
    d = dataclasses.asdict(DataConfig(seq_len=64))
    assert d["seq_len"] == 64 and DataConfig(**d) == DataConfig(seq_len=64)

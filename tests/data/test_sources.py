import json

import pytest

from moelab.data import DataConfig, TrainStream, Tokenizer, load_corpus
from moelab.data.sources import split_text
from moelab.errors import MoelabError


def all_docs(s):
    return s.train + s.val + s.test


def para(i):
    return f"Paragraph {i}. " + "lorem ipsum dolor " * 30 + "\n"


@pytest.fixture
def text_folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "news").mkdir(parents=True)
    (root / "poems" / "old").mkdir(parents=True)
    files = {"news/a.txt": "alpha news", "news/b.md": "# beta\nnews", "poems/old/c.txt": "gamma poem",
             "top.txt": "top level", "skip.py": "print('no')", ".hidden/d.txt": "hidden"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_folder_loader(text_folder, tmp_path):
    s = load_corpus(DataConfig(source=str(text_folder), cache_dir=str(tmp_path / "c"), val_fraction=0.0,
                               test_fraction=0.0))
    got = {d.doc_id: (d.domain, d.text) for d in all_docs(s)}
    assert got == {"news/a.txt": ("news", "alpha news"), "news/b.md": ("news", "# beta\nnews"),
                   "poems/old/c.txt": ("poems", "gamma poem"), "top.txt": ("corpus", "top level")}
    assert s.domains == ["corpus", "news", "poems"]
    assert s.manifest["files_per_domain"] == {"corpus": 1, "news": 2, "poems": 1}


def test_folder_change_invalidates_cache(text_folder, tmp_path):
    cfg = DataConfig(source=str(text_folder), cache_dir=str(tmp_path / "c"))
    a = load_corpus(cfg)
    (text_folder / "news" / "a.txt").write_text("alpha news, edited and longer")
    b = load_corpus(cfg)
    assert a.manifest["content_hash"] != b.manifest["content_hash"]


def test_single_text_file_is_cut_into_documents(tmp_path):
    text = "\n".join(para(i) for i in range(40))
    f = tmp_path / "book.txt"
    f.write_text(text)
    s = load_corpus(DataConfig(source=str(f), cache_dir=str(tmp_path / "c")))
    docs = sorted(all_docs(s), key=lambda d: d.doc_id)
    assert len(docs) > 5 and {d.domain for d in docs} == {"book"}
    assert "".join(d.text for d in docs) == text
    assert split_text(text, 100) and "".join(split_text(text, 100)) == text


def test_jsonl_loader_with_domain_field(tmp_path):
    f = tmp_path / "rows.jsonl"
    rows = [{"body": f"row {i} " * 5, "lang": ["en", "fr"][i % 2]} for i in range(30)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    s = load_corpus(DataConfig(source=str(f), text_field="body", domain_field="lang",
                               cache_dir=str(tmp_path / "c")))
    docs = sorted(all_docs(s), key=lambda d: d.doc_id)
    assert [(d.text, d.domain) for d in docs] == [(r["body"], r["lang"]) for r in rows]
    assert s.domains == ["en", "fr"]
    plain = load_corpus(DataConfig(source=str(f), text_field="body", cache_dir=str(tmp_path / "c")))
    assert plain.domains == ["rows"]


def test_jsonl_missing_fields_are_clear_errors(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(MoelabError, match=r"text_field='text' is missing in rows:000000002.*body"):
        load_corpus(DataConfig(source=str(f), cache_dir=str(tmp_path / "c")))
    with pytest.raises(MoelabError, match="domain_field='lang'"):
        load_corpus(DataConfig(source=str(f), domain_field="lang", text_field="text",
                               cache_dir=str(tmp_path / "c2")))
    f.write_text("{not json\n")
    with pytest.raises(MoelabError, match="line 1 is not valid JSON"):
        load_corpus(DataConfig(source=str(f), cache_dir=str(tmp_path / "c3")))


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"content": [f"sample {i} text" for i in range(40)], "topic": ["a", "b"] * 20}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    s = load_corpus(DataConfig(source=f"hf:{tmp_path / 'ds'}", text_field="content", domain_field="topic",
                               cache_dir=str(tmp_path / "c")))
    docs = sorted(all_docs(s), key=lambda d: d.doc_id)
    assert [(d.text, d.domain) for d in docs] == list(zip(rows["content"], rows["topic"]))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x1", "x2"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["y1"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    s2 = load_corpus(DataConfig(source=f"hf:{tmp_path / 'dd'}", cache_dir=str(tmp_path / "c")))
    assert sorted(d.text for d in all_docs(s2)) == ["x1", "x2", "y1"] and s2.domains == ["dd"]
    s3 = load_corpus(DataConfig(source=f"hf:{tmp_path / 'dd'}", hf_split="validation",
                                cache_dir=str(tmp_path / "c")))
    assert [d.text for d in all_docs(s3)] == ["y1"]
    with pytest.raises(MoelabError, match="hf_split='nope'.*'train'"):
        load_corpus(DataConfig(source=f"hf:{tmp_path / 'dd'}", hf_split="nope", cache_dir=str(tmp_path / "c")))
    with pytest.raises(MoelabError, match=r"text_field='body' is not a column.*\['text'\]"):
        load_corpus(DataConfig(source=f"hf:{tmp_path / 'dd'}", text_field="body", cache_dir=str(tmp_path / "c")))


def test_hf_name_without_permission_never_downloads(tmp_path):
    with pytest.raises(MoelabError, match="hf_allow_download=True"):
        load_corpus(DataConfig(source="hf:someone/some-dataset", cache_dir=str(tmp_path)))


@pytest.mark.parametrize("kind", ["folder", "file", "jsonl", "blank"])
def test_empty_datasets_are_clear_errors(kind, tmp_path):
    if kind == "folder":
        (tmp_path / "empty").mkdir()
        src = tmp_path / "empty"
    elif kind == "blank":
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "a.txt").write_text("")
        src = tmp_path / "f"
    else:
        src = tmp_path / ("e.txt" if kind == "file" else "e.jsonl")
        src.write_text("\n")
    with pytest.raises(MoelabError, match="empty|no non-empty"):
        load_corpus(DataConfig(source=str(src), cache_dir=str(tmp_path / "c")))


def test_too_small_dataset_names_sizes(tmp_path):
    f = tmp_path / "tiny.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"tiny {i}"}) for i in range(50)))
    s = load_corpus(DataConfig(source=str(f), cache_dir=str(tmp_path / "c")))
    n = sum(len(d.text) + 1 for d in s.train)
    with pytest.raises(MoelabError, match=f"train split has {n:,} tokens but one batch needs 8,193"):
        TrainStream(s.train, Tokenizer("byte"), 512, 16, cache_dir=tmp_path / "c")


def test_hf_name_with_permission_calls_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name):  # stands in for the network
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["p", "q", "r"]})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    s = load_corpus(DataConfig(source="hf:someone/some-dataset", hf_allow_download=True,
                               cache_dir=str(tmp_path)))
    assert calls == ["someone/some-dataset"]
    assert sorted(d.text for d in all_docs(s)) == ["p", "q", "r"] and s.domains == ["someone_some-dataset"]

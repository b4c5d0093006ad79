import json
import string

import numpy as np
import pytest
import torch

from moelab.data import Document, Tokenizer, TrainStream, eval_batches, tokenize_documents
from moelab.errors import MoelabError

BYTE = Tokenizer("byte")


def letter_docs(lengths, domains):
    """Document k is one repeated letter, so every token tells which document it came from."""
    return [Document(f"d{k}", string.ascii_letters[k] * n, dom)
            for k, (n, dom) in enumerate(zip(lengths, domains))]


def batches_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(
        (a.input_ids_BL, a.labels_BL, a.valid_BL, a.domain_B), (b.input_ids_BL, b.labels_BL, b.valid_BL, b.domain_B)))


DOCS = letter_docs([97, 40, 203, 11, 150, 66, 120], ["x", "y", "x", "y", "x", "y", "x"])


def test_train_batches_are_packed_shifted_and_cover_one_epoch():
    L, B = 16, 4
    ts = TrainStream(DOCS, BYTE, L, B, seed=3)
    n_tokens = sum(len(d.text) + 1 for d in DOCS)
    assert ts.n_tokens == n_tokens and ts.windows_per_epoch == (n_tokens - 1) // L
    counts = {}
    for _ in range(ts.batches_per_epoch):
        b = ts.next_batch()
        assert b.input_ids_BL.shape == (B, L) and b.valid_BL.all()
        assert torch.equal(b.labels_BL[:, :-1], b.input_ids_BL[:, 1:])
        for row in b.input_ids_BL.tolist():
            # inside a row, a document's letters are contiguous and EOS separates documents
            runs = "".join("|" if t == BYTE.eos_id else chr(t) for t in row).split("|")
            for r in runs:
                assert len(set(r)) <= 1
            for t in row:
                counts[t] = counts.get(t, 0) + 1
    assert ts.epoch == 0 and ts.cursor == ts.batches_per_epoch
    covered = sum(counts.values())
    assert covered == ts.batches_per_epoch * B * L
    for d in DOCS:
        assert counts.get(ord(d.text[0]), 0) <= len(d.text)
    # windows are distinct: missing tokens are only the dropped windows and the tail
    assert n_tokens - covered <= (ts.windows_per_epoch - ts.batches_per_epoch * B) * L + L


def test_domain_is_majority_of_row():
    L, B = 32, 2
    dom_of = {ord(d.text[0]): d.domain for d in DOCS}
    ts = TrainStream(DOCS, BYTE, L, B, seed=0, domains=["x", "y"])
    for _ in range(3 * ts.batches_per_epoch):
        b = ts.next_batch()
        for row, dom in zip(b.input_ids_BL.tolist(), b.domain_B.tolist()):
            votes = {"x": 0, "y": 0}
            for t in row:
                if t != BYTE.eos_id:
                    votes[dom_of[t]] += 1
            eos = row.count(BYTE.eos_id)
            if abs(votes["x"] - votes["y"]) > eos:  # unambiguous whatever EOS counts for
                assert ["x", "y"][dom] == max(votes, key=votes.get)


def test_same_seed_same_batches_other_seed_differs():
    a, b, c = (TrainStream(DOCS, BYTE, 8, 3, seed=s) for s in (1, 1, 2))
    xa = [a.next_batch() for _ in range(10)]
    assert all(batches_equal(x, b.next_batch()) for x in xa)
    assert not all(batches_equal(x, c.next_batch()) for x in xa)


def test_epochs_reshuffle():
    ts = TrainStream(DOCS, BYTE, 8, 3, seed=0)
    e0 = [ts.next_batch() for _ in range(ts.batches_per_epoch)]
    e1 = [ts.next_batch() for _ in range(ts.batches_per_epoch)]
    assert ts.epoch == 1
    assert not all(batches_equal(x, y) for x, y in zip(e0, e1))


@pytest.mark.parametrize("k", [0, 5, 23, 61])
def test_resume_yields_exactly_the_same_next_batches(k):
    a = TrainStream(DOCS, BYTE, 8, 3, seed=7)
    for _ in range(k):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch() for _ in range(2 * a.batches_per_epoch)]
    b = TrainStream(DOCS, BYTE, 8, 3, seed=7)
    b.next_batch()  # a different position before loading
    b.load_state_dict(state)
    assert all(batches_equal(x, b.next_batch()) for x in expected)


def test_resume_with_other_shapes_is_an_error():
    a = TrainStream(DOCS, BYTE, 8, 3, seed=7)
    b = TrainStream(DOCS, BYTE, 16, 3, seed=7)
    with pytest.raises(MoelabError, match="seq_len"):
        b.load_state_dict(a.state_dict())


def test_token_array_and_tokenized_docs_inputs():
    arr = np.arange(1000) % 200
    ts = TrainStream(arr, BYTE, 10, 4, seed=0)
    b = ts.next_batch()
    assert (b.domain_B == 0).all()
    for row, lab in zip(b.input_ids_BL.tolist(), b.labels_BL.tolist()):
        start = row[0]
        assert row == [(start + i) % 200 for i in range(10)] and lab[-1] == (start + 10) % 200
    td = tokenize_documents(DOCS, BYTE, use_cache=False)
    assert batches_equal(TrainStream(td, BYTE, 8, 3, seed=1).next_batch(),
                         TrainStream(DOCS, BYTE, 8, 3, seed=1).next_batch())


def test_too_small_train_split_names_sizes():
    with pytest.raises(MoelabError, match=r"train split has 12 tokens but one batch needs 4,097"):
        TrainStream([Document("a", "hello world", "x")], BYTE, 1024, 4)


def eval_oracle(docs, domain):
    return sum(len(d.text) + 1 for d in docs if d.domain == domain)


def test_eval_batches_pack_each_domain_exactly():
    L, B = 16, 3
    batches = list(eval_batches(DOCS, BYTE, L, B, ["y", "x"]))
    again = list(eval_batches(DOCS, BYTE, L, B, ["y", "x"]))
    assert len(again) == len(batches) and all(batches_equal(p, q) for p, q in zip(batches, again))
    seen = {0: [], 1: []}
    for b in batches:
        assert b.input_ids_BL.shape[1] == L and 1 <= b.input_ids_BL.shape[0] <= B
        dom = b.domain_B.unique().tolist()
        assert len(dom) == 1
        v = b.valid_BL
        assert (b.labels_BL[~v] == -100).all() and (b.labels_BL[v] >= 0).all()
        # the input at t+1 is the label at t wherever both are real
        both = v[:, :-1] & v[:, 1:]
        assert torch.equal(b.input_ids_BL[:, 1:][both], b.labels_BL[:, :-1][both])
        seen[dom[0]].extend(b.labels_BL[v].tolist())
    for di, name in enumerate(["y", "x"]):
        n = eval_oracle(DOCS, name)
        assert len(seen[di]) == n - 1  # every token but the first is predicted exactly once
        letters = [ord(d.text[0]) for d in DOCS if d.domain == name]
        assert set(seen[di]) <= set(letters) | {BYTE.eos_id}
        for d in DOCS:
            if d.domain == name:
                assert seen[di].count(ord(d.text[0])) in (len(d.text), len(d.text) - 1)


def test_eval_padding_and_max_batches():
    L = 16
    batches = list(eval_batches(DOCS, BYTE, L, 2, ["x", "y"]))
    last_x = [b for b in batches if b.domain_B[0] == 0][-1]
    assert not last_x.valid_BL[-1, -1]
    pad_in = last_x.input_ids_BL[-1][~last_x.valid_BL[-1]]
    assert (pad_in[1:] == BYTE.pad_id).all()
    capped = list(eval_batches(DOCS, BYTE, L, 2, ["x", "y"], max_batches=1))
    assert [b.domain_B[0].item() for b in capped] == [0, 1]
    assert all(batches_equal(c, b) for c, b in zip(capped[:1], batches[:1]))


def test_eval_skips_unknown_domains_and_rejects_empty():
    only_x = list(eval_batches(DOCS, BYTE, 16, 2, ["x"]))
    assert all((b.domain_B == 0).all() for b in only_x)
    with pytest.raises(MoelabError, match="empty"):
        list(eval_batches([], BYTE, 16, 2, ["x"]))


def test_embedded_bpe_stream_and_eval(small_splits, small_bpe):
    ts = TrainStream(small_splits.train, small_bpe, 64, 4, seed=0, domains=small_splits.domains)
    b = ts.next_batch()
    assert b.input_ids_BL.max() < small_bpe.vocab_size
    doms = {int(b.domain_B[0]) for b in eval_batches(small_splits.val, small_bpe, 64, 4, small_splits.domains)}
    present = {small_splits.domains.index(d.domain) for d in small_splits.val}
    assert doms == present


def test_tokenized_cache_round_trip(tmp_path):
    a = tokenize_documents(DOCS, BYTE, cache_dir=tmp_path)
    from moelab.data import loader
    loader._MEMO.clear()
    b = tokenize_documents(DOCS, BYTE, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 1
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
    assert a.domains == b.domains and a.doc_ids == b.doc_ids

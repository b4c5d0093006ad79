import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.routing import RoutingResult


def test_from_topk_views_round_trip():
    idx = torch.tensor([[0, 2], [1, 0], [3, 1]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    r = RoutingResult.from_topk(idx, w, num_experts=4).validate()
    i2, w2, keep = r.topk_view()
    assert torch.equal(i2, idx) and torch.equal(w2, w) and bool(keep.all())
    assert r.counts_E().tolist() == [2, 2, 1, 1]
    assert r.offsets_T1.tolist() == [0, 2, 4, 6]
    dense = r.dense_TE()
    assert dense[0, 2] == 0.3 and dense[2, 3] == 0.5 and dense.sum() == 3.0


def test_drops_and_padding_are_not_counted():
    idx = torch.tensor([[0, 1], [0, 1], [0, 1]])
    r = RoutingResult.from_topk(idx, torch.ones(3, 2), num_experts=2,
                                valid_T=torch.tensor([True, True, False]))
    r = r.with_keep(torch.tensor([True, True, True, False, True, True]))
    assert r.counts_E().tolist() == [2, 1]
    assert r.routed_counts_E().tolist() == [2, 2]
    assert r.dropped_fraction() == pytest.approx(0.25)
    assert r.kept().num_slots == 5 and r.kept().k is None


def test_validate_rejects_duplicates_and_range():
    with pytest.raises(MoelabError, match="same expert twice"):
        RoutingResult.from_topk(torch.tensor([[1, 1]]), torch.ones(1, 2), num_experts=2).validate()
    with pytest.raises(MoelabError, match="out of range"):
        RoutingResult.from_topk(torch.tensor([[0, 5]]), torch.ones(1, 2), num_experts=2).validate()


def test_from_mask_variable_k():
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    r = RoutingResult.from_mask(mask, torch.rand(3, 3)).validate()
    assert r.experts_per_token_T().tolist() == [2, 0, 3]
    assert r.offsets_T1.tolist() == [0, 2, 2, 5]

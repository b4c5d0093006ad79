"""routing_stats on hand-built routings (balanced, all-to-one, drops, padding)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moelab.layers.routing import RoutingResult
from moelab.layers.stats import STAT_KEYS, routing_stats


def test_balanced_routing():
    T, E = 8, 4
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    probs = torch.full((T, E), 1.0 / E)
    r = RoutingResult.from_topk(idx, torch.full((T, 2), 0.5), E, probs_TE=probs)
    s = routing_stats(r)
    assert set(s) == set(STAT_KEYS)
    assert s["counts"] == [4, 4, 4, 4]
    assert s["load_max_over_mean"] == pytest.approx(1.0) and s["load_cv"] == pytest.approx(0.0)
    assert s["router_entropy"] == pytest.approx(math.log(E))
    assert s["experts_per_token"] == 2.0 and s["experts_per_token_hist"] == [0, 0, 8]
    assert s["unused_experts"] == 0 and s["dropped_frac"] == 0.0 and s["bias_norm"] == 0.0
    json.dumps(s)  # plain Python values


def test_all_to_one_routing():
    T, E = 6, 4
    probs = torch.zeros(T, E)
    probs[:, 2] = 1.0
    r = RoutingResult.from_topk(torch.full((T, 1), 2), torch.ones(T, 1), E, probs_TE=probs,
                                selection_bias_E=torch.tensor([3.0, 4.0, 0.0, 0.0]))
    s = routing_stats(r)
    assert s["counts"] == [0, 0, 6, 0]
    assert s["load_max_over_mean"] == pytest.approx(4.0)
    counts = torch.tensor([0.0, 0, 6, 0])
    assert s["load_cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))
    assert s["router_entropy"] == pytest.approx(0.0)
    assert s["unused_experts"] == 3 and s["bias_norm"] == pytest.approx(5.0)


def test_padding_and_drops_excluded():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 1.0, 1.0]])
    r = RoutingResult.from_mask(mask, probs, probs_TE=probs, valid_T=torch.tensor([True, True, True, False]))
    r = r.with_keep(torch.tensor([True, False, True, True, True, True]))  # drop token 0's expert 1
    s = routing_stats(r)
    assert s["counts"] == [2, 0, 0]  # padding token 3 not counted
    assert s["dropped_frac"] == pytest.approx(1 / 3)
    assert s["experts_per_token_hist"] == [1, 2]  # tokens 0,1 keep one; token 2 none
    assert s["experts_per_token"] == pytest.approx(2 / 3)
    ent = [-2 * 0.5 * math.log(0.5), 0.0, -sum(p * math.log(p) for p in (0.2, 0.3, 0.5))]
    assert s["router_entropy"] == pytest.approx(sum(ent) / 3)


def test_no_probs_gives_nan_entropy():
    r = RoutingResult.from_topk(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 2)
    assert math.isnan(routing_stats(r)["router_entropy"])

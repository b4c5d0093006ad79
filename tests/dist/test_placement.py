"""EPLB reproduces DeepSeek's README example; LLEP against plain EP; the bytes-per-token model."""

import pytest
import torch

from moelab.dist.placement.eplb import balanced_packing, rebalance_experts, replicate
from moelab.errors import MoelabError

# deepseek-ai/EPLB README, "Interface and Example"
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_eplb_reproduces_deepseek_readme_example():
    plan = rebalance_experts(README_WEIGHT, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert torch.equal(plan.phy2log, README_PHY2LOG)


def test_eplb_plan_is_consistent():
    plan = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    for x in range(2):
        assert torch.equal(torch.bincount(plan.phy2log[x], minlength=12), plan.logcnt[x])
        for e in range(12):
            slots = [s for s in plan.log2phy[x, e].tolist() if s >= 0]
            assert sorted(slots) == [s for s in range(16) if plan.phy2log[x, s] == e]
    loads = plan.gpu_loads(README_WEIGHT)
    assert torch.allclose(loads.sum(1), README_WEIGHT.double().sum(1))
    # replication lowers the hottest GPU below plain EP's (12 experts over 8 GPUs is uneven; compare per slot)
    assert float(loads.max(1).values[0]) < float(README_WEIGHT[0].max())


def test_packing_and_replication_oracles():
    pack, pos = balanced_packing([5.0, 1.0, 4.0, 2.0], 2)  # 5 -> p0, 4 -> p1, 2 -> p1, 1 -> p0
    assert pack == [0, 0, 1, 1] and pos == [0, 1, 0, 1]
    experts, ranks, count = replicate([10.0, 1.0, 6.0], 5)  # 10 -> 2 copies (5 each), then 6 -> 2 copies
    assert experts == [0, 1, 2, 0, 2] and count == [2, 1, 2] and ranks == [0, 0, 0, 1, 1]


def test_eplb_bad_sizes():
    with pytest.raises(MoelabError, match="num_replicas=15 must be a multiple of num_gpus=8"):
        rebalance_experts(README_WEIGHT, 15, 4, 2, 8)


def test_llep_balances_an_imbalanced_layer_and_keeps_every_token():
    from moelab.dist.placement.llep import llep_plan, native_loads

    counts = [400, 10, 10, 10, 30, 30, 20, 10]  # expert 0 is hot: rank 0 carries 420 of 520 tokens
    plain = native_loads(counts, 4)
    assert plain == [410, 20, 60, 30]
    plan = llep_plan(counts, 4, alpha=1.0)
    assert sum(plan.loads) == sum(counts)
    for e, c in enumerate(counts):
        assert sum(n for _, n in plan.chunks[e]) == c
    assert max(plan.loads) == 130 and plan.max_over_mean() == pytest.approx(1.0)  # 520/4 = 130 each
    assert {t[0] for t in plan.transfers} == {0} and all(t[1] == 0 for t in plan.transfers)
    # below the threshold, plain EP is kept
    assert llep_plan(counts, 4, threshold=5.0).loads == plain


def test_bytes_per_token_model():
    from moelab.dist.comm_model import bytes_per_token

    # plain EP, k=2, D=1024, bf16, 8 ranks: 2 * 2 * 1024 * 2 * 7/8
    assert bytes_per_token(2, 1024, "bfloat16", 8) == 2 * 2 * 1024 * 2 * 7 / 8
    # an expert on every rank is always local
    assert bytes_per_token(2, 1024, "bfloat16", 8, copies_E=[8, 8], load_E=[1, 1]) == 0.0

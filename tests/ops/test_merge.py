"""Merging: identical experts, permutation alignment, Sub-MoE's joint SVD, clustering oracles, persistence."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ops_helpers import Stack, moe_cfg

from moelab.errors import MoelabError
from moelab.layers.moe import MoELayer
from moelab.ops.apply import expert_weights, layer_overrides
from moelab.ops.calibrate import CalibrationConfig, calibrate
from moelab.ops.merge import MergeConfig, align_permutation, merge_model, weighted_average
from moelab.ops.merge.base import one_expert, permute_expert
from moelab.ops.merge.hc_smoe import average_linkage
from moelab.ops.merge.sub_moe import joint_svd, kmeans, merge_subspace


def _two_kinds_layer():
    """8 experts: 0-3 are copies of one expert, 4-7 of another (router rows copied too)."""
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg())
    with torch.no_grad():
        for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            w = getattr(layer.experts, name)
            w[1:4] = w[0]
            w[5:8] = w[4]
        g = layer.router.gate.weight_ED
        g[1:4] = g[0] + 1e-3 * torch.randn(3, 16)   # similar (not equal) logits so every expert is used
        g[5:8] = g[4] + 1e-3 * torch.randn(3, 16)
    return layer


@pytest.mark.parametrize("method", ["hc_smoe", "m_smoe", "sub_moe"])
def test_merging_identical_experts_leaves_outputs_unchanged(windows, method):
    model = Stack([_two_kinds_layer()]).eval()
    st = calibrate(model, windows, CalibrationConfig(progress=False, sample_tokens=32))
    st[0].count_E = np.array([10.0, 1, 2, 3, 10, 3, 2, 1])  # M-SMoE's dominant experts: 0 and 4, one per kind
    before = model(windows.ids_NL).logits
    man = merge_model(model, st, MergeConfig(method=method, keep=2))
    assert sorted(map(sorted, man["layers"]["0"]["groups"])) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert model.blocks[0].cfg.num_experts == 2
    torch.testing.assert_close(model(windows.ids_NL).logits, before, rtol=1e-5, atol=1e-5)


def test_permutation_alignment_recovers_a_permuted_copy_exactly():
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(num_experts=2))
    perm = torch.randperm(8)
    with torch.no_grad():
        ex = layer.experts
        ex.w_gate_EFD[1], ex.w_up_EFD[1], ex.w_down_EDF[1] = ex.w_gate_EFD[0][perm], ex.w_up_EFD[0][perm], ex.w_down_EDF[0][:, perm]
    w = expert_weights(layer)
    found = align_permutation(w, 0, 1)
    assert torch.equal(perm[found], torch.arange(8))
    aligned = permute_expert(w, 1, found)
    for name, t in one_expert(w, 0).items():
        assert torch.equal(aligned[name], t)
    # the permuted copy computes the same function before and after alignment
    x = torch.randn(5, 16)
    from moelab.layers.experts import expert_forward
    torch.testing.assert_close(expert_forward(layer.experts, x, 1), expert_forward(layer.experts, x, 0))


def test_joint_svd_at_full_rank_reproduces_every_expert():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    U, S, Vs = joint_svd(ws)
    for w, v in zip(ws, Vs):
        torch.testing.assert_close((U * S) @ v.T, w, rtol=1e-12, atol=1e-12)
    U2, S2, V2 = joint_svd(ws, rank=2)
    assert U2.shape == (6, 2) and float(((U2 * S2) @ V2[0].T - ws[0]).abs().max()) > 1e-3  # truncation loses
    # merged at full rank = the frequency-weighted average (the V_i merge is linear)
    torch.testing.assert_close(merge_subspace(ws, np.array([1.0, 1.0, 2.0]), None), (ws[0] + ws[1] + 2 * ws[2]) / 4)


def test_weighted_average_by_hand():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(weighted_average([a, b], np.array([1.0, 3.0]))["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(weighted_average([a, b], np.array([0.0, 0.0]))["w"], torch.tensor([2.0, 4.0]))


def test_average_linkage_matches_scipy():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(10, 3))
    mine = average_linkage(squareform(pdist(pts)), 4)
    ref = fcluster(linkage(pdist(pts), "average"), 4, "maxclust")
    same = lambda lab: {(i, j) for i in range(10) for j in range(10) if lab[i] == lab[j]}  # noqa: E731
    assert same(mine) == same(list(ref))


def test_kmeans_separates_clear_clusters():
    z = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [0, 0.1], [5, 5.1]], dtype=float)
    lab = kmeans(z, 2)
    assert lab[0] == lab[1] == lab[4] and lab[2] == lab[3] == lab[5] and lab[0] != lab[2]


def test_merged_model_saves_through_layer_overrides(toy_model, windows):
    from dataclasses import replace

    from moelab.models.transformer import MoETransformer

    st = calibrate(toy_model, windows, CalibrationConfig(progress=False, sample_tokens=16))
    m = copy.deepcopy(toy_model)
    merge_model(m, st, MergeConfig(method="m_smoe", keep=0.5))
    ov = layer_overrides(m, toy_model.cfg.layer_moe_config())
    assert ov["0"]["router"] == "wrapped" and ov["0"]["num_experts"] == 4
    rebuilt = MoETransformer(replace(toy_model.cfg, layer_overrides=ov).validate())
    rebuilt.load_state_dict(m.state_dict())
    x = windows.ids_NL
    assert torch.equal(rebuilt.eval()(x).logits, m(x).logits)
    assert rebuilt.num_parameters()["total"] < toy_model.num_parameters()["total"]


def test_merge_errors(toy_model, windows):
    st = calibrate(toy_model, windows, CalibrationConfig(progress=False, sample_tokens=16))
    with pytest.raises(MoelabError, match="choose one of: 'dern', 'hc_smoe', 'm_smoe', 'mc_smoe', 'sub_moe'"):
        merge_model(copy.deepcopy(toy_model), st, MergeConfig(method="ties"))
    with pytest.raises(MoelabError, match="fewer than its k=2"):
        merge_model(copy.deepcopy(toy_model), st, MergeConfig(method="hc_smoe", keep=1))
    with pytest.raises(MoelabError, match="rank"):
        merge_model(copy.deepcopy(toy_model), st, MergeConfig(method="sub_moe", keep=0.5, options={"rank": 0}))


def test_dern_recombines_dropped_neurons_into_their_most_similar_neuron():
    from moelab.ops.merge.dern import recombine

    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(num_experts=2))
    with torch.no_grad():  # expert 1 = expert 0 with neurons permuted: each segment lands on its twin
        perm = torch.randperm(8)
        ex = layer.experts
        ex.w_gate_EFD[1], ex.w_up_EFD[1], ex.w_down_EDF[1] = ex.w_gate_EFD[0][perm], ex.w_up_EFD[0][perm], ex.w_down_EDF[0][:, perm]
    w = expert_weights(layer)
    out, absorbed = recombine(w, [0], np.array([3.0, 1.0]))
    assert absorbed == {0: 8}
    for name in w:
        torch.testing.assert_close(out[name][0], w[name][0], rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # a dissimilar dropped expert moves the retained weights, by the 3:1 gate mass
        ex.w_up_EFD[1] = -ex.w_up_EFD[1]
    out, _ = recombine(expert_weights(layer), [0], np.array([3.0, 1.0]))
    assert not torch.allclose(out["w_up_EFD"][0], w["w_up_EFD"][0])


def test_dern_model_drops_router_rows(toy_model, windows):
    st = calibrate(toy_model, windows, CalibrationConfig(progress=False, sample_tokens=16))
    m = copy.deepcopy(toy_model)
    man = merge_model(m, st, MergeConfig(method="dern", keep=0.5))
    from moelab.models.moe_protocol import moe_layers

    assert all(s.layer.cfg.num_experts == 4 and s.layer.cfg.router == "softmax_topk" for s in moe_layers(m))
    assert len(man["layers"]["0"]["kept"]) == 4
    assert m(windows.ids_NL).logits.isfinite().all()


def test_low_rank_plus_sparse_by_hand():
    from moelab.ops.merge.mc_smoe import low_rank_plus_sparse

    w = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    approx, stored = low_rank_plus_sparse(w, 1, 0.0)      # rank 1 keeps the 5
    torch.testing.assert_close(approx, torch.diag(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)))
    assert stored == 1 * (3 + 3)
    approx, stored = low_rank_plus_sparse(w, 1, 2 / 9)    # + the two largest residual entries (3 and 1)
    torch.testing.assert_close(approx, w)
    assert stored == 6 + 2


def test_mc_smoe_records_the_factored_size(toy_model, windows):
    st = calibrate(toy_model, windows, CalibrationConfig(progress=False, sample_tokens=16))
    m = copy.deepcopy(toy_model)
    man = merge_model(m, st, MergeConfig(method="mc_smoe", keep=0.5, options={"rank": 4, "sparse": 0.05}))
    stored = man["layers"]["0"]["stored_expert_params"]
    F, D = 16, 32
    assert stored == 4 * 3 * (4 * (F + D) + round(0.05 * F * D))  # 4 experts x 3 matrices
    assert m(windows.ids_NL).logits.isfinite().all()

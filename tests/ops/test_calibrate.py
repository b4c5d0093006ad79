"""Calibration statistics against an independent per-token loop, and criterion scores against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ops_helpers import Stack, moe_cfg

from moelab.errors import MoelabError
from moelab.layers.moe import MoELayer
from moelab.ops.calibrate import CalibrationConfig, LayerStats, calibrate, domain_balanced_windows, text_windows
from moelab.ops.prune import PRUNE_CRITERIA


def _expert(layer, e, x_D):
    ex = layer.experts
    h = F.silu(ex.w_gate_EFD[e] @ x_D) * (ex.w_up_EFD[e] @ x_D)
    return ex.w_down_EDF[e] @ h


@torch.no_grad()
def _loop_oracle(layer, x_TD, y_TD, dom_T, E, k, thr):
    """Every statistic recomputed token by token from the router's softmax and the SwiGLU formula."""
    out = {n: np.zeros(E) for n in ("count", "gate", "ean", "reap", "easy", "max")}
    tc = np.zeros((2, E))
    for t in range(x_TD.shape[0]):
        x = x_TD[t].double()
        p = torch.softmax(layer.router.gate.weight_ED.double() @ x, -1)
        top = torch.topk(p, k).indices.tolist()
        w = p[top] / p[top].sum()
        s = 1 - float(F.cosine_similarity(x, x + y_TD[t].double(), dim=0))
        for e, g in zip(top, w.tolist()):
            f = _expert(layer, e, x.float()).double()
            n = float(f.norm())
            out["count"][e] += 1
            out["gate"][e] += g
            out["ean"][e] += n
            out["reap"][e] += g * n
            out["easy"][e] += g * n * s
            out["max"][e] = max(out["max"][e], float(f.abs().max()))
        tc[int(dom_T[t])] += (p * (p >= thr)).numpy()
    return out, tc


def test_calibration_matches_a_token_loop(windows):
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg())
    model = Stack([layer]).eval()
    st = calibrate(model, windows, CalibrationConfig(progress=False, sample_tokens=40))[0]
    with torch.no_grad():
        x_TD = model.emb(windows.ids_NL).reshape(-1, 16)
        y_TD = layer(x_TD)
    dom_T = windows.domain_N[:, None].expand_as(windows.ids_NL).reshape(-1)
    ref, tc = _loop_oracle(layer, x_TD, y_TD, dom_T, 8, 2, 1 / 8)
    for mine, theirs in ((st.count_E, "count"), (st.gate_sum_E, "gate"), (st.ean_sum_E, "ean"),
                         (st.reap_sum_E, "reap"), (st.easy_sum_E, "easy"), (st.max_act_E, "max")):
        np.testing.assert_allclose(mine, ref[theirs], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st.tcess_sum_GE, tc, rtol=1e-5)
    assert st.tokens == x_TD.shape[0] and st.count_E.sum() == 2 * x_TD.shape[0]
    assert np.allclose(np.diag(st.coact_EE), st.count_E)
    assert st.out_END.shape == (8, 40, 16) and st.logits_NE.shape == (40, 8)
    torch.testing.assert_close(st.out_END[3, 5], _expert(layer, 3, x_TD[5]).float(), rtol=1e-4, atol=1e-6)


def _stats() -> LayerStats:
    """Hand-built: expert 0 routed twice (g .5, ||f|| 2; g 1, ||f|| 1), expert 1 never, expert 2 once."""
    st = LayerStats(index=0, num_experts=3, k=1, tokens=3)
    st.count_E = np.array([2.0, 0.0, 1.0])
    st.gate_sum_E = np.array([1.5, 0.0, 0.25])
    st.ean_sum_E = np.array([3.0, 0.0, 8.0])
    st.reap_sum_E = np.array([0.5 * 2 + 1.0 * 1, 0.0, 0.25 * 8])
    st.easy_sum_E = np.array([0.5 * 2 * 0.1 + 1.0 * 1 * 0.3, 0.0, 0.25 * 8 * 0.5])
    st.tcess_sum_GE = np.array([[0.6, 0.0, 0.3], [0.0, 0.9, 0.0]])
    st.tokens_G = np.array([2.0, 1.0])
    return st


@pytest.mark.parametrize("name, expected", [
    ("frequency", [2, 0, 1]),
    ("soft_count", [1.5, 0, 0.25]),
    ("ean", [3, 0, 8]),
    ("reap", [1.0, 0, 2.0]),          # mean over routed tokens: (0.5*2 + 1*1)/2, 0 (never routed), 0.25*8/1
    ("easy_ep", [0.4, 0, 1.0]),       # 0.5*2*0.1 + 1*1*0.3, 0, 0.25*8*0.5
    ("tcess", [0.2, 0.3, 0.1]),       # all 3 tokens: (0.6, 0.9, 0.3) / 3
])
def test_criterion_scores_equal_hand_values(name, expected):
    np.testing.assert_allclose(PRUNE_CRITERIA.get(name)(_stats()), expected, rtol=1e-12)


def test_tcess_of_one_task():
    np.testing.assert_allclose(PRUNE_CRITERIA.get("tcess")(_stats(), task=1), [0, 0.9, 0])
    np.testing.assert_allclose(PRUNE_CRITERIA.get("tcess")(_stats(), task=0), [0.3, 0, 0.15])


def test_domain_balanced_sample_is_seeded_and_balanced():
    class Docs:
        domains = ["a", "a", "b"]
        def __len__(self): return 3
        def doc(self, i): return np.arange(100) + 1000 * i

    w1 = domain_balanced_windows(Docs(), 9, 10, 60, seed=3, domains=["a", "b"])
    w2 = domain_balanced_windows(Docs(), 9, 10, 60, seed=3, domains=["a", "b"])
    assert torch.equal(w1.ids_NL, w2.ids_NL) and w1.tokens == 60
    assert w1.domain_N.tolist() == [0, 0, 0, 1, 1, 1]
    assert (w1.ids_NL[3:] >= 2000).logical_or(w1.ids_NL[3:] == 9).all()  # domain b windows come from doc 2
    with pytest.raises(MoelabError, match="calibration tokens=5000"):
        domain_balanced_windows(Docs(), 9, 10, 5000, seed=0, domains=["a", "b"])


def test_text_source_with_too_few_tokens_is_an_error():
    class Tok:
        eos_id = 0
        def encode(self, t): return [1] * len(t)

    assert text_windows(["x" * 40], Tok(), 8, 32).ids_NL.shape == (4, 8)
    with pytest.raises(MoelabError, match="more than the source has"):
        text_windows(["x" * 40], Tok(), 8, 1000)


def test_dense_model_is_a_clear_error(windows):
    from moelab.models.config import ModelConfig
    from moelab.models.transformer import MoETransformer

    dense = MoETransformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff_dense=32, moe_layers="none"))
    with pytest.raises(MoelabError, match="dense model"):
        calibrate(dense, windows, CalibrationConfig(progress=False))


@pytest.mark.parametrize("field, value", [("tokens", 0), ("sample_tokens", 0), ("tcess_threshold", 1.5)])
def test_bad_calibration_config(field, value):
    with pytest.raises(MoelabError, match=field):
        CalibrationConfig(**{field: value}).validate()


def test_math_sanity():
    assert math.isclose(PRUNE_CRITERIA.get("reap")(_stats())[0], 1.0)

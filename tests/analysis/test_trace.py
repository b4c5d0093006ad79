"""Routing traces: capture from a model, storage round trip, model/token checks, bad run dirs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from analysis_helpers import TinyMoE
from moelab.analysis import analyze_run, analyze_trace, compare_traces, list_checkpoints, trace_model, trace_run
from moelab.analysis.trace import Trace, check_trace_matches_run, config_hash
from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer


def tiny_model(top_p=None, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff_dense=32,
                      moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2))
    return MoETransformer(cfg, moe_factory=lambda c: TinyMoE(c, top_p=top_p))


def windows(B=3, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (B, L), generator=g)
    labels = torch.randint(0, 50, (B, L), generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[-1, -4:] = False
    return ids, labels, valid


def test_trace_matches_the_layers_routing_and_round_trips(tmp_path):
    model = tiny_model()
    ids, labels, valid = windows()
    tr = trace_model(model, ids, [0, 1, 1], ["a", "b"], labels_BL=labels, valid_BL=valid, step=7)
    assert [lt.layer for lt in tr.layers] == [0, 1]
    for (idx, layer), lt in zip(model.moe_layers(), tr.layers):
        r = layer.last_routing
        np.testing.assert_array_equal(lt.token_S, r.token_S.numpy())
        np.testing.assert_array_equal(lt.expert_S, r.expert_S.numpy())
        # the captured hidden states are what the router saw, in the routing's token order
        probs = torch.softmax(layer.router(torch.from_numpy(lt.hidden_TD)), -1).detach().numpy()
        np.testing.assert_allclose(probs, lt.probs_TE, atol=1e-5)
        np.testing.assert_allclose(lt.router_w_ED, layer.router.weight.detach().numpy())
    assert tr.domain_T.tolist() == [0] * 12 + [1] * 24
    assert tr.seq_T.tolist() == sum(([b] * 12 for b in range(3)), [])
    path = tr.save(tmp_path / "t.safetensors")
    back = Trace.load(path)
    for name in ("token_ids_T", "domain_T", "seq_T", "pos_T", "valid_T", "loss_T"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tr, name))
    for a, b in zip(tr.layers, back.layers):
        for name in ("token_S", "expert_S", "weight_S", "probs_TE", "hidden_TD", "router_w_ED"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6)
    assert back.step == 7 and back.domains == ["a", "b"]


def test_token_losses_match_model_loss():
    model = tiny_model()
    ids, labels, valid = windows()
    tr = trace_model(model, ids, [0, 0, 0], ["a"], labels_BL=labels, valid_BL=valid)
    out = model(ids, labels_BL=labels, valid_BL=valid)
    assert tr.loss_T[tr.valid_T].mean() == pytest.approx(float(out.lm_loss.detach()), rel=1e-5)


def test_variable_k_router_is_stored_in_csr(tmp_path):
    model = tiny_model(top_p=0.6)
    ids, labels, valid = windows(B=4, L=16)
    tr = Trace.load(trace_model(model, ids, [0, 1, 0, 1], ["a", "b"], labels_BL=labels).save(tmp_path / "v.st"))
    lt = tr.layers[0]
    ept = np.bincount(lt.token_S, minlength=tr.num_tokens)
    ref = model.blocks[0].ffn.last_routing.experts_per_token_T().numpy()
    np.testing.assert_array_equal(ept, ref)
    assert len(np.unique(ept)) > 1, "top-p should give a varying number of experts"
    res = analyze_trace(tr)
    assert "experts_vs_loss" in res["layers"][0]
    assert res["layers"][0]["experts_per_token_mean"] == pytest.approx(ept.mean())


def test_trace_from_another_model_is_detected():
    ids, labels, valid = windows()
    a = trace_model(tiny_model(), ids, [0, 0, 0], ["a"], config_hash_=config_hash({"model": {"d_model": 16}}))
    b = trace_model(tiny_model(seed=1), ids, [0, 0, 0], ["a"], config_hash_=config_hash({"model": {"d_model": 32}}))
    with pytest.raises(MoelabError, match="different models"):
        compare_traces(a, b)
    with pytest.raises(MoelabError, match="another model"):
        check_trace_matches_run(a, {"model": {"d_model": 32}})
    c = trace_model(tiny_model(), windows(seed=5)[0], [0, 0, 0], ["a"], config_hash_=a.config_hash)
    with pytest.raises(MoelabError, match="different tokens"):
        compare_traces(a, c)


def test_identical_and_changed_traces():
    ids, labels, valid = windows()
    a = trace_model(tiny_model(), ids, [0, 0, 0], ["a"])
    same = compare_traces(a, a)
    assert all(r["changed_frac"] == 0.0 and r["saturation"] == 1.0 for r in same["layers"])
    b = trace_model(tiny_model(), ids, [0, 0, 0], ["a"])
    for lt in b.layers:  # k=2 of E=4: route every token to the other two experts
        comp_TE = ~lt.mask_TE(b.num_tokens)
        lt.token_S, lt.expert_S = (x.astype(np.int64) for x in np.nonzero(comp_TE))
        lt.weight_S = np.full(lt.token_S.shape, 0.5)
    diff = compare_traces(a, b)
    assert all(r["changed_frac"] == 1.0 and r["saturation"] == 0.0 for r in diff["layers"])


def test_bad_run_dirs(tmp_path):
    with pytest.raises(MoelabError, match="not a directory"):
        list_checkpoints(tmp_path / "missing")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(MoelabError, match="no checkpoints"):
        list_checkpoints(run)
    with pytest.raises(MoelabError, match="no checkpoints"):
        analyze_run(run)
    with pytest.raises(MoelabError, match="no config.json"):
        analyze_run(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a trace")
    with pytest.raises(MoelabError, match="not a safetensors trace"):
        Trace.load(tmp_path / "junk.safetensors")


def test_trace_run_on_a_real_micro_run(micro_run, tiny_moe):
    assert list_checkpoints(micro_run) == [4, 8]
    with pytest.raises(MoelabError, match="step=5 has no checkpoint"):
        trace_run(micro_run, 5)
    a = trace_run(micro_run, 4, num_windows=4, seed=1)
    b = trace_run(micro_run, 4, num_windows=4, seed=1)
    np.testing.assert_array_equal(a.token_ids_T, b.token_ids_T)  # seeded sample: the same windows
    assert set(a.domain_T.tolist()) == {0, 1} and a.domains == ["code", "prose"]
    assert a.config_hash == config_hash(json.loads((micro_run / "config.json").read_text()))
    assert a.weights_checksum
    last = trace_run(micro_run, None, num_windows=4, seed=1)
    assert last.step == 8 and last.weights_checksum != a.weights_checksum
    check_trace_matches_run(last, json.loads((micro_run / "config.json").read_text()))


def test_real_moe_layer_trace():
    moe = pytest.importorskip("moelab.layers.moe")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff_dense=32,
                      moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2))
    model = MoETransformer(cfg)
    assert all(isinstance(layer, moe.MoELayer) for _, layer in model.moe_layers())
    ids, labels, valid = windows()
    tr = trace_model(model, ids, [0, 0, 0], ["a"], labels_BL=labels, valid_BL=valid)
    for (_, layer), lt in zip(model.moe_layers(), tr.layers):
        np.testing.assert_array_equal(lt.expert_S, layer.last_routing.expert_S.numpy())
        assert lt.hidden_TD.shape == (36, 16)
    res = analyze_trace(tr)
    assert len(res["layers"]) == 2


def test_saved_traces_are_reused_only_for_the_same_checkpoint(micro_run, tiny_moe, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("analysis", "report"))
    ra = analyze_run(run, steps=[8], num_windows=4)
    path = run / "analysis" / "trace_step_000008.safetensors"
    st = json.loads((run / "checkpoints" / "step_000008" / "state.json").read_text())
    assert ra.traces[8].weights_checksum == st["sha256"]["model.safetensors"]
    mtime = path.stat().st_mtime_ns
    analyze_run(run, steps=[8], num_windows=4)
    assert path.stat().st_mtime_ns == mtime  # reused
    tr = Trace.load(path)
    tr.weights_checksum = "stale"
    tr.save(path)
    again = analyze_run(run, steps=[8], num_windows=4)
    assert again.traces[8].weights_checksum == st["sha256"]["model.safetensors"]  # re-traced


@pytest.mark.parametrize("name", ["softmax_topk", "noisy_topk", "kmeans", "cosine"])
def test_router_directions_of_real_routers(name):
    pytest.importorskip("moelab.layers.moe")
    from moelab.analysis.trace import _router_matrix

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff_dense=32,
                      moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2, router=name))
    layer = next(MoETransformer(cfg).moe_layers())[1]
    w = _router_matrix(layer, 4, 16)
    r = dict(list(layer.router.named_parameters()) + list(layer.router.named_buffers()))
    expected = {
        "softmax_topk": lambda: r["gate.weight_ED"],
        "noisy_topk": lambda: r["gate.weight_ED"],  # not the noise gate
        "kmeans": lambda: r["centroids_ED"],
        "cosine": lambda: r["centroids_EP"] @ r["proj_PD"],
    }[name]().detach().numpy()
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_analyze_trace_on_a_constructed_routing():
    """Two domains routed to disjoint expert pairs, one sequence of 8 tokens (4 per domain)."""
    from moelab.analysis.trace import LayerTrace

    T = 8
    tok = np.repeat(np.arange(T), 2)
    exp = np.array([[0, 1] if t < 4 else [2, 3] for t in range(T)]).reshape(-1)
    lt = LayerTrace(layer=0, num_experts=4, token_S=tok, expert_S=exp, weight_S=np.full(16, 0.5))
    tr = Trace(token_ids_T=np.arange(T), domain_T=np.array([0] * 4 + [1] * 4), seq_T=np.zeros(T, np.int64),
               pos_T=np.arange(T), valid_T=np.ones(T, bool), layers=[lt], domains=["a", "b"])
    r = analyze_trace(tr)["layers"][0]
    assert r["specialisation"] == pytest.approx(1.0)
    assert r["max_over_mean"] == pytest.approx(1.0) and r["unused"] == 0
    assert r["consecutive_overlap"] == pytest.approx(6 / 7)  # one switch of expert set among 7 pairs
    assert r["srp_seg_len"] == 8 and r["srp"] == pytest.approx(0.5)  # best 2 experts cover half the window
    assert r["sch"] == pytest.approx(12 / 16)  # cache of 2k = 4 experts: only the 4 first uses miss
    np.testing.assert_allclose(r["coactivation_EE"], [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])

"""Routing replay (record / replay in RoutingResult CSR form, memory or safetensors) and router swap."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.moe_protocol import moe_layers
from moelab.models.replay import RoutingRecording, record_routing, replay_routing
from moelab.models.router_swap import swap_routers
from moelab.models.transformer import MoETransformer

V = 64


def _model(seed=0, router="softmax_topk", **moe):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff_dense=32,
                      moe=MoEConfig(d_ff=16, num_experts=6, k=2, router=router, **moe))
    m = MoETransformer(cfg)
    with torch.no_grad():
        for s in moe_layers(m):
            s.layer.router.gate.weight_ED.normal_(0, 1.0)
    return m


def _ids(L=8, seed=0):
    return torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(seed))


def _chosen(model):
    return {s.index: (s.layer.last_routing.token_S.clone(), s.layer.last_routing.expert_S.clone()) for s in moe_layers(model)}


@pytest.mark.parametrize("moe", [dict(), dict(router_kwargs={"score_order": "topk_then_softmax"}),
                                 dict(router_kwargs={"renormalize": False}), dict(router="sigmoid_topk",
                                 router_kwargs={"n_groups": 3, "topk_groups": 2, "route_scale": 2.0})])
def test_replay_with_unchanged_weights_is_bit_identical(moe, tmp_path):
    model, ids = _model(**moe).eval(), _ids()
    with record_routing(model) as rec:
        y0 = model(ids).logits
    rec = RoutingRecording.load(rec.save(tmp_path / "r.safetensors"))
    with replay_routing(model, rec):
        y1 = model(ids).logits
    assert torch.equal(y0, y1)


def test_replay_under_changed_router_selects_the_recorded_experts():
    model, ids = _model().eval(), _ids()
    with record_routing(model) as rec:
        model(ids)
    recorded = _chosen(model)
    with torch.no_grad():
        for s in moe_layers(model):
            s.layer.router.gate.weight_ED.normal_(0, 1.0)  # a different router
    model(ids)
    assert any(not torch.equal(recorded[i][1], e) for i, (_, e) in _chosen(model).items())  # it would route elsewhere
    with replay_routing(model, rec):
        model(ids)
    for i, (t, e) in _chosen(model).items():
        assert torch.equal(t, recorded[i][0]) and torch.equal(e, recorded[i][1])


def test_replay_weights_come_from_the_current_router_and_gradients_reach_the_gate():
    model, ids = _model(), _ids()
    with record_routing(model) as rec:
        model(ids)
    layer = moe_layers(model)[0].layer
    with torch.no_grad():
        layer.router.gate.weight_ED.mul_(0.5)
    with replay_routing(model, rec):
        model(ids, labels_BL=ids).loss.backward()
    r = layer.last_routing
    x_probs = r.probs_TE  # current router's probabilities
    idx = rec.layers[0].expert_S.view(-1, 2)
    w = x_probs.gather(1, idx)
    torch.testing.assert_close(r.weight_S.view(-1, 2), w / w.sum(-1, keepdim=True))  # oracle: renormalised gather
    g = layer.router.gate.weight_ED.grad
    assert g is not None and g.abs().sum() > 0


def test_recording_from_another_model_or_length_is_refused():
    model = _model().eval()
    with record_routing(model) as rec:
        model(_ids(8))
    with pytest.raises(MoelabError, match="another sequence length"), replay_routing(model, rec):
        model(_ids(6))
    other = MoETransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                                       d_ff_dense=32, moe=MoEConfig(d_ff=16, num_experts=4, k=2)))
    with pytest.raises(MoelabError, match="another model"), replay_routing(other, rec):
        pass


def test_corrupt_recording_file_is_refused(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(MoelabError, match="not a moelab routing recording"):
        RoutingRecording.load(p)
    with pytest.raises(MoelabError, match="does not exist"):
        RoutingRecording.load(tmp_path / "missing.safetensors")


def test_swap_routers_initialises_from_old_weights_and_freezes_experts():
    model = _model()
    old = {s.index: s.layer.router.gate.weight_ED.detach().clone() for s in moe_layers(model)}
    copied = swap_routers(model, "sigmoid_topk", router_kwargs={"route_scale": 1.0})
    assert copied == {0: True, 1: True}
    for s in moe_layers(model):
        assert s.layer.cfg.router == "sigmoid_topk" and type(s.layer.router).__name__ == "SigmoidTopKRouter"
        assert torch.equal(s.layer.router.gate.weight_ED, old[s.index])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    model(_ids(), labels_BL=_ids()).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert moe_layers(model)[0].layer.router.gate.weight_ED.grad.abs().sum() > 0


def test_swap_to_router_without_matrix_reports_not_copied_and_bad_name_fails():
    model = _model()
    assert set(swap_routers(model, "hash", freeze_experts=False).values()) == {False}
    with pytest.raises(MoelabError, match="router"):
        swap_routers(model, "no_such_router")

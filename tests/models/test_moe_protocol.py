"""The MoE-layer protocol works on moelab's transformer and on a foreign module tree."""

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.models.config import ModelConfig
from moelab.models.moe_protocol import (
    calibration_hooks, get_site, moe_layers, rebuild_layer, replace_experts, replace_moe_layer, replace_router,
    require_moe,
)
from moelab.models.transformer import MoETransformer


def _model(**kw):
    return MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff_dense=64,
                                      moe=MoEConfig(d_ff=32, num_experts=4, k=2), **kw))


class Foreign(nn.Module):
    """Not a MoETransformer: MoE layers nested at arbitrary attributes, like an imported HF model."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(2):
            blk = nn.Module()
            blk.mlp = MoELayer(MoEConfig(d_model=16, d_ff=16, num_experts=4, k=1))
            blk.mlp.layer_index = 5 + i
            self.layers.append(blk)

    def forward(self, x):
        for blk in self.layers:
            x = x + blk.mlp(x)
        return x


def test_sites_on_transformer_and_foreign_tree():
    m = _model(moe_layers=[0, 2])
    assert [s.index for s in moe_layers(m)] == [0, 2]
    f = Foreign()
    sites = moe_layers(f)
    assert [s.index for s in sites] == [5, 6] and sites[1].layer is f.layers[1].mlp and sites[1].attr == "mlp"


def test_replace_layer_router_and_experts():
    f = Foreign()
    new = rebuild_layer(f.layers[0].mlp, num_experts=3)
    replace_moe_layer(f, 5, new)
    assert f.layers[0].mlp is new and new.layer_index == 5 and new.cfg.num_experts == 3
    with pytest.raises(MoelabError, match="num_experts"):
        replace_experts(new, f.layers[1].mlp.experts)
    with pytest.raises(MoelabError, match="not an MoE block"):
        get_site(f, 0)
    old = replace_router(f.layers[1].mlp, rebuild_layer(f.layers[1].mlp).router)
    assert old is not f.layers[1].mlp.router


def test_calibration_hooks_see_each_layer_once_and_are_removed():
    f = Foreign()
    seen = []
    x = torch.randn(3, 5, 16)
    with calibration_hooks(f, lambda s, xt, yt: seen.append((s.index, tuple(xt.shape), s.layer.last_routing.num_tokens))):
        f(x)
    assert seen == [(5, (15, 16), 15), (6, (15, 16), 15)]
    f(x)
    assert len(seen) == 2


def test_require_moe_on_dense_model():
    with pytest.raises(MoelabError, match="dense model"):
        require_moe(_model(moe_layers="none"), "pruning")


def test_layer_overrides_build_per_block_expert_counts_and_validate():
    m = _model(layer_overrides={"1": {"num_experts": 3, "k": 1}})
    counts = {s.index: s.layer.cfg.num_experts for s in moe_layers(m)}
    assert counts == {0: 4, 1: 3, 2: 4}
    assert m(torch.randint(0, 64, (2, 6))).logits.shape == (2, 6, 64)
    with pytest.raises(MoelabError, match="unknown fields"):
        _model(layer_overrides={"1": {"experts": 3}})
    with pytest.raises(MoelabError, match="not an MoE block"):
        _model(layer_overrides={"7": {"k": 1}})
    with pytest.raises(MoelabError, match="k"):
        _model(layer_overrides={"0": {"num_experts": 2, "k": 3}})
    rt = ModelConfig.from_dict(m.cfg.to_dict())
    assert rt.layer_overrides == {"1": {"num_experts": 3, "k": 1}}

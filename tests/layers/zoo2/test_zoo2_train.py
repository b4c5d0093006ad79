"""Every zoo-2 router inside the real MoELayer and a micro MoETransformer: a few training steps, no NaNs."""

import pytest
import torch

from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.layers.routing import RoutingContext
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer

CASES = [
    ("sinkhorn", {}),
    ("sinkhorn", {"variant": "selective", "ot_prob": 0.5}),
    ("base", {}),
    ("bip", {}),
    ("hash", {"vocab_size": 64}),
    ("hash", {"method": "balanced", "vocab_size": 64}),
    ("hash", {"method": "bigram", "vocab_size": 64, "seed": 1}),
    ("random_fixed", {"k_start": 1, "ramp_steps": 3}),
    ("random_fixed", {"mode": "thor"}),
    ("hyper_router", {"embed_dim": 8}),
    ("stablemoe", {"stage1_steps": 2, "vocab_size": 64, "distill_dim": 4}),
    ("recurrent", {}),
    ("attention_router", {}),
    ("chain_of_experts", {"n_iters": 2}),
    ("smear", {}),
    ("smear", {"merge": "token"}),
    ("competesmoe", {"rate": 1.0, "warm_up": 1}),
    ("mixture_of_routers", {"n_routers": 3}),
    ("erc", {"erc_coef": 0.1}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else n for n, kw in CASES]
# the micro-model run: one case per router name in the fast suite, the other variants marked slow
_seen: set[str] = set()
TRAIN_CASES = []
for (_n, _kw), _id in zip(CASES, IDS):
    marks = [pytest.mark.slow] if _n in _seen else []
    _seen.add(_n)
    TRAIN_CASES.append(pytest.param(_n, _kw, id=_id, marks=marks))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_router_inside_moe_layer_forward_backward(name, kw):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=24, num_experts=4, k=2, router=name, router_kwargs=kw))
    x = torch.randn(2, 6, 16, requires_grad=True)
    ctx = RoutingContext(batch_shape=(2, 6), token_ids_T=torch.randint(0, 64, (12,)), state={})
    y = layer(x, ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    assert layer.last_stats["counts"] and layer.last_routing is not None
    layer.last_routing.validate()


@pytest.mark.parametrize("name,kw", TRAIN_CASES)
def test_micro_model_trains_a_few_steps_without_nans(name, kw):
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=24, num_experts=4, k=2, router=name, router_kwargs=kw)
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                       d_ff_dense=32, moe=moe))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    losses = []
    for _ in range(3):
        out = model(ids[:, :-1], labels_BL=ids[:, 1:])
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0]  # it learns something on a repeated batch
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, :-1]).logits).all()

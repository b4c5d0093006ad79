"""Each zoo-1 router trains a micro MoE transformer a few steps on synthetic tokens without NaNs."""

import math

import pytest
import torch

ZOO1 = ["top_p", "null_experts", "relu", "cosine", "kmeans", "norm"]


@pytest.mark.parametrize("router", ZOO1)
def test_micro_model_trains_without_nans(router):
    pytest.importorskip("moelab.layers.moe", reason="MoELayer (moelab.layers.moe) not available yet")
    from moelab.layers.config import MoEConfig
    from moelab.models.config import ModelConfig
    from moelab.models.transformer import MoETransformer

    torch.manual_seed(0)
    aux = "none" if router == "kmeans" else "switch"  # relu and null_experts replace it themselves
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2, router=router, aux_loss=aux,
                    router_kwargs={"d_space": 8} if router == "cosine" else {})
    model = MoETransformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                       d_ff_dense=32, moe=moe))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 32, (4, 12))
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[1, 8:] = False  # a padded sequence
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = model(ids, labels_BL=ids, valid_BL=valid)
        assert math.isfinite(float(out.loss.detach()))
        out.loss.backward()
        for p in model.parameters():
            assert p.grad is None or bool(torch.isfinite(p.grad).all())
        opt.step()
        losses.append(float(out.lm_loss.detach()))
    assert losses[-1] < losses[0]
    for _, layer in model.moe_layers():  # the reported mean, against a count over the routing's slots
        r = layer.last_routing
        keep = r.keep_S if r.keep_S is not None else torch.ones_like(r.token_S, dtype=torch.bool)
        per_token = [int(((r.token_S == t) & keep).sum()) for t in range(r.num_tokens)]
        real = valid.reshape(-1).tolist()
        want = sum(n for n, v in zip(per_token, real) if v) / sum(real)
        assert layer.last_stats["experts_per_token"] == pytest.approx(want)
        assert 0 < want <= 4 and math.isfinite(want)

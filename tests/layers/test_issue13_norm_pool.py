"""Issue 13: NormRouter's losses in UniPool's form and the pool loss lagged by one micro-batch,
against hand-computed values (loops over tokens and layers)."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from moelab.layers.balancing import install_aux_free_hook
from moelab.layers.config import MoEConfig
from moelab.layers.layouts import LayoutConfig
from moelab.layers.moe import MoELayer
from moelab.layers.pool import PoolBalance, build_layout
from moelab.layers.routing import RoutingContext

D, E, K = 16, 8, 2


def norm_layer(form=None, aux_loss="switch", scale=1.7):
    torch.manual_seed(0)
    kw = {} if form is None else {"loss_form": form}
    layer = MoELayer(MoEConfig(d_model=D, d_ff=24, num_experts=E, k=K, router="norm", aux_loss=aux_loss,
                               aux_loss_coef=1.0, router_kwargs=kw))
    with torch.no_grad():
        layer.router.norm_scale.fill_(scale)
    return layer


def scores_and_counts(layer, x):
    """NormRouter by hand: s = scale * ReLU(z / (||z|| + eps)), counts of the positive top-k slots."""
    z = x @ layer.router.gate.weight_ED.detach().T
    s = float(layer.router.norm_scale.detach()) * torch.relu(z / (z.norm(dim=-1, keepdim=True) + 1e-9))
    c = torch.zeros(E)
    for t in range(x.shape[0]):
        for e in s[t].topk(K).indices.tolist():
            c[e] += float(s[t, e] > 0)
    return s, c


def test_norm_router_default_loss_is_unipools_raw_score_form_and_trains_the_scale():
    """Before: the loss normalised the scores per token, so norm_scale got no gradient (-1.9e-9)."""
    layer = norm_layer()
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    (layer(x) * 0).sum().backward()  # only the attached aux loss sends gradient
    s, c = scores_and_counts(layer, x)
    T = x.shape[0]
    want = E * sum(c[i] / (K * T) * s[:, i].sum() / T for i in range(E))  # Megatron: E/(kT^2) sum_i c_i S_i
    got = layer.last_aux["aux_loss"].item()
    assert got == pytest.approx(float(want), rel=1e-5)
    # the loss is linear in the scale (counts are constants): d loss / d scale = loss / scale
    assert float(layer.router.norm_scale.grad) == pytest.approx(got / 1.7, rel=1e-4)


def test_norm_router_normalized_form_is_the_old_switch_loss_and_ignores_the_scale():
    layer = norm_layer("normalized")
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    (layer(x) * 0).sum().backward()
    s, c = scores_and_counts(layer, x)
    p = s / s.sum(-1, keepdim=True)
    want = E * sum(c[i] / c.sum() * p[:, i].mean() for i in range(E))
    assert layer.last_aux["aux_loss"].item() == pytest.approx(float(want), rel=1e-5)
    assert abs(float(layer.router.norm_scale.grad)) < 1e-6


def test_norm_router_sequence_loss_in_unipool_form():
    layer = norm_layer(aux_loss="sequence")
    B, L = 2, 10
    x = torch.randn(B * L, D, generator=torch.Generator().manual_seed(2))
    layer(x, RoutingContext(batch_shape=(B, L)))
    want = 0.0
    for b in range(B):
        s, c = scores_and_counts(layer, x[b * L:(b + 1) * L])
        want += E * sum(c[i] / (K * L) * s[:, i].sum() / L for i in range(E)) / B
    assert layer.last_aux["aux_loss"].item() == pytest.approx(float(want), rel=1e-5)


def test_norm_router_global_loss_in_unipool_form_uses_the_steps_counts_so_far():
    layer = norm_layer(aux_loss="global")
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(24, D, generator=g), torch.randn(16, D, generator=g)
    layer(x1)
    layer(x2)
    (s1, c1), (s2, c2) = scores_and_counts(layer, x1), scores_and_counts(layer, x2)
    want = E * sum((c1[i] + c2[i]) / (K * 40) * s2[:, i].sum() / 16 for i in range(E))
    assert layer.last_aux["aux_loss"].item() == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------- pool loss: lags and forms
def pool_stack(mode, router="softmax_topk", coef=0.5, L=2):
    torch.manual_seed(4)
    moe = MoEConfig(d_model=D, d_ff=24, num_experts=4, k=K, router=router, aux_loss="none")
    owner, layers = build_layout(LayoutConfig(kind="shared_pool", pool_size=6, pool_loss_coef=coef,
                                              pool_loss_mode=mode), moe, list(range(L)))
    layers = [layers[i] for i in range(L)]
    model = nn.ModuleList([owner, *layers])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    install_aux_free_hook(opt, model)
    return owner, layers, opt


def micro_batch(layers, x):
    """Every layer sees x (a stand-in for its hidden state); returns per-layer (probs, counts, T)."""
    ctx = RoutingContext(state={})
    out = [layer(x, replace(ctx, layer_index=i)) for i, layer in enumerate(layers)]
    sum((y * 0).sum() for y in out).backward()
    usage = []
    for layer in layers:
        r = layer.last_routing
        usage.append((r.probs_TE, torch.bincount(r.expert_S, minlength=6).double(), x.shape[0]))
    return usage


def hand_pool_terms(layers, usage, prev_counts, prev_tokens, form):
    """UniPool's per-layer term coef * N * sum_j f_j * pbar_lj / n_layers, f from the previous counts."""
    coef, N, n_layers = 0.5, 6, len(layers)
    terms = []
    for p, _, T in usage:
        f = prev_counts / (K * prev_tokens) if form == "unipool" else prev_counts / max(float(prev_counts.sum()), 1.0)
        pn = p if form == "unipool" else p / p.sum(-1, keepdim=True)
        terms.append(coef * N * sum(float(f[j]) * float(pn[:, j].sum()) / T for j in range(N)) / n_layers)
    return terms


@pytest.mark.parametrize("router,form", [("softmax_topk", "normalized"), ("norm", "unipool")])
def test_pool_loss_lagged_by_one_micro_batch_under_grad_accumulation(router, form):
    """Default mode (UniPool's code): each micro-batch's term uses the previous micro-batch's pool
    counts, also across an optimizer step (grad_accum = 2 here). Before: no such mode."""
    owner, layers, opt = pool_stack("lagged_micro", router)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(12, D, generator=g) for _ in range(3)]
    u1 = micro_batch(layers, xs[0])
    assert all(l.last_aux["pool_loss"].item() == 0.0 for l in layers)  # nothing before the first
    u2 = micro_batch(layers, xs[1])
    for layer, want in zip(layers, hand_pool_terms(layers, u2, sum(u[1] for u in u1), 2 * 12, form)):
        assert layer.last_aux["pool_loss"].item() == pytest.approx(want, rel=1e-5)
    opt.step()  # the end of a grad_accum=2 step: the micro-batch lag does not reset
    u3 = micro_batch(layers, xs[2])
    for layer, want in zip(layers, hand_pool_terms(layers, u3, sum(u[1] for u in u2), 2 * 12, form)):
        assert layer.last_aux["pool_loss"].item() == pytest.approx(want, rel=1e-5)


def test_pool_loss_lagged_by_one_optimizer_step_with_grad_accumulation():
    """``lagged``: both micro-batches of step 2 use the counts of both micro-batches of step 1."""
    owner, layers, opt = pool_stack("lagged")
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(12, D, generator=g) for _ in range(4)]
    u1, u2 = micro_batch(layers, xs[0]), micro_batch(layers, xs[1])
    assert all(l.last_aux["pool_loss"].item() == 0.0 for l in layers)
    opt.step()
    prev = sum(u[1] for u in u1 + u2)
    for x in xs[2:]:
        u = micro_batch(layers, x)
        for layer, want in zip(layers, hand_pool_terms(layers, u, prev, 4 * 12, "normalized")):
            assert layer.last_aux["pool_loss"].item() == pytest.approx(want, rel=1e-5)


def test_norm_router_pool_loss_gives_the_scale_gradient():
    """UniPool's pool loss on raw NormRouter scores reaches norm_scale; the normalised form does not."""
    grads = {}
    for form in ("unipool", "normalized"):
        torch.manual_seed(4)
        moe = MoEConfig(d_model=D, d_ff=24, num_experts=4, k=K, router="norm", aux_loss="none",
                        router_kwargs={"loss_form": form})
        owner, layers = build_layout(LayoutConfig(kind="shared_pool", pool_size=6, pool_loss_coef=1.0), moe, [0, 1])
        x = torch.randn(12, D, generator=torch.Generator().manual_seed(7))
        for _ in range(2):
            for p in layers[0].router.parameters():
                p.grad = None
            micro_batch([layers[0], layers[1]], x)
        grads[form] = float(layers[0].router.norm_scale.grad)
    assert abs(grads["unipool"]) > 1e-3 and abs(grads["normalized"]) < 1e-6


def test_pool_balance_loads_checkpoints_without_the_micro_batch_buffers():
    bal = PoolBalance(4, [0, 1])
    state = {k: v for k, v in bal.state_dict().items() if not k.startswith("mb_prev")}
    bal.load_state_dict(state)  # strict: old checkpoints still load
    assert float(bal.mb_prev_count_N.sum()) == 0.0
    with pytest.raises(Exception, match="pool_loss_mode"):
        PoolBalance(4, [0, 1], mode="lagged_batch")

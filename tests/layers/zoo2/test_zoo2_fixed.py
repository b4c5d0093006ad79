"""Fixed / generated routers: hash, random_fixed (SMoE-Dropout, THOR), hyper_router, stablemoe."""

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routers.hash_router import greedy_balanced_table
from moelab.layers.routers.random_fixed import thor_consistency_loss
from moelab.layers.routing import RoutingContext

D = 8


def make(name, E=4, k=1, **kw):
    torch.manual_seed(0)
    return build_router(MoEConfig(d_model=D, num_experts=E, k=k, router=name, router_kwargs=kw))


def ids_ctx(ids, **kw):
    return RoutingContext(token_ids_T=ids, **kw)


# ------------------------------------------------------------------ hash
@pytest.mark.parametrize("method", ["random", "balanced"])
@pytest.mark.parametrize("k", [1, 3])
def test_hash_is_a_pure_function_of_the_token_id(method, k):
    r = make("hash", E=6, k=k, method=method, vocab_size=100)
    ids = torch.tensor([5, 17, 5, 99, 17, 0, 5])
    a = r(torch.randn(7, D), ids_ctx(ids)).validate()
    b = r(torch.randn(7, D) * 10, ids_ctx(ids)).validate()  # different hidden states
    assert torch.equal(a.expert_S, b.expert_S)
    e = a.expert_S.view(7, k)
    assert torch.equal(e[0], e[2]) and torch.equal(e[0], e[6]) and torch.equal(e[1], e[4])
    perm = torch.randperm(7)
    c = r(torch.randn(7, D), ids_ctx(ids[perm]))
    assert torch.equal(c.expert_S.view(7, k), e[perm])  # position and neighbours do not matter
    # oracle, per token: expert j is table j at the id, moved on (mod E) past experts already taken
    want = []
    for t in ids.tolist():
        row = []
        for j in range(k):
            ej = int(r.table_KV[j][t])
            while ej in row:
                ej = (ej + 1) % 6
            row.append(ej)
        want.append(row)
    assert e.tolist() == want
    assert bool((e.sort(-1).values[:, 1:] != e.sort(-1).values[:, :-1]).all())  # MultiHash: distinct
    assert torch.allclose(a.weight_S, torch.ones(7 * k))
    assert not any(p.requires_grad for p in r.parameters())


def test_bigram_hash_is_a_pure_function_of_previous_and_current_id():
    r = make("hash", E=8, k=2, method="bigram", vocab_size=100)
    ids = torch.tensor([[5, 17, 5, 17], [9, 5, 17, 3]])
    ctx = ids_ctx(ids.reshape(-1), batch_shape=(2, 4))
    e = r(torch.randn(8, D), ctx).validate().expert_S.view(2, 4, 2)
    assert torch.equal(e[0, 1], e[1, 2]) and torch.equal(e[0, 1], e[0, 3])  # pair (5, 17) every time
    prev = torch.tensor([0, 5, 17, 5, 0, 9, 5, 17])
    a, b, c = r.bigram_K3[0].tolist()
    first = ((a * prev + b * ids.reshape(-1) + c) % 2_147_483_647) % 8
    assert torch.equal(e.reshape(8, 2)[:, 0], first)
    # the same current id after different previous ids goes to different experts: not a unigram hash
    pairs = torch.stack([torch.arange(1, 41), torch.full((40,), 7)], dim=1)  # (prev, 7) for 40 prevs
    e3 = r(torch.randn(80, D), ids_ctx(pairs.reshape(-1), batch_shape=(40, 2))).expert_S.view(40, 2, 2)
    assert e3[:, 1, 0].unique().numel() > 1


def test_hash_without_token_ids_raises_naming_them():
    r = make("hash")
    with pytest.raises(MoelabError, match="token_ids_T"):
        r(torch.randn(3, D), RoutingContext())
    with pytest.raises(MoelabError, match="token_ids_T"):
        r(torch.randn(3, D))


def test_greedy_balanced_table_matches_the_greedy_oracle():
    counts = torch.tensor([50.0, 1, 30, 30, 2, 20, 10, 9, 8, 40])
    table = greedy_balanced_table(counts, 3)
    load = [0.0] * 3
    for v in sorted(range(10), key=lambda v: (-counts[v].item(), v)):
        e = min(range(3), key=lambda e: (load[e], e))
        assert table[v] == e
        load[e] += counts[v].item()


def test_hash_balanced_fit_balances_a_skewed_stream():
    r = make("hash", E=4, k=1, method="random", vocab_size=64, seed=3)
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 65).float() ** 1.1
    stream = torch.multinomial(weights, 4000, replacement=True, generator=g)
    before = r(torch.zeros(4000, D), ids_ctx(stream)).counts_E().float()
    r.fit_balanced([stream[:2000], stream[2000:]])
    after = r(torch.zeros(4000, D), ids_ctx(stream)).counts_E().float()
    assert r.method == "balanced"
    assert after.max() / after.mean() < before.max() / before.mean()
    assert after.max() / after.mean() < 1.3


# ------------------------------------------------------------------ random_fixed
def test_frozen_random_router_has_no_parameters_and_fixed_decisions():
    r = make("random_fixed", E=8, k=2)
    assert list(r.parameters()) == []
    x = torch.randn(20, D, requires_grad=True)
    a = r(x)
    a.weight_S.sum().backward()  # gradients reach the input, never the router
    assert x.grad is not None
    for _ in range(3):
        r(torch.randn(20, D))
    b = r(x)
    assert torch.equal(a.expert_S, b.expert_S) and torch.equal(a.weight_S, b.weight_S)
    logits = x.detach() @ r.weight_ED.t()
    assert torch.equal(a.expert_S.view(20, 2), torch.topk(logits, 2).indices)


def test_smoe_dropout_k_grows_over_training_steps_and_eval_k_is_free():
    r = make("random_fixed", E=8, k=1, k_start=1, k_end=8, ramp_steps=16)
    ks = []
    for _ in range(20):
        ks.append(r(torch.randn(5, D)).k)
    assert ks[0] == 1 and ks[-1] == 8 and all(a <= b for a, b in zip(ks, ks[1:]))
    assert int(r.step) == 20
    r.eval()
    assert r(torch.randn(5, D)).k == 8 and int(r.step) == 20  # eval does not advance
    r.eval_k = 3
    assert r(torch.randn(5, D)).k == 3


def test_thor_routes_uniformly_at_random():
    r = make("random_fixed", E=4, k=1, mode="thor")
    torch.manual_seed(1)
    res = r(torch.zeros(4000, D))
    counts = res.counts_E().float()
    assert (counts / 1000 - 1).abs().max() < 0.1
    again = r(torch.zeros(4000, D))
    assert not torch.equal(res.expert_S, again.expert_S)  # stochastic experts
    assert torch.allclose(res.weight_S, torch.ones(4000))


def test_thor_consistency_loss_is_the_symmetric_kl():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    ref = 0.5 * ((pa * (pa / pb).log()).sum(-1) + (pb * (pb / pa).log()).sum(-1)).mean()
    assert torch.allclose(thor_consistency_loss(a, b), ref, atol=1e-6)
    assert thor_consistency_loss(a, a + 3.0) < 1e-6  # same distribution: zero
    valid = torch.tensor([True] * 3 + [False] * 3)
    ref3 = 0.5 * ((pa * (pa / pb).log()).sum(-1) + (pb * (pb / pa).log()).sum(-1))[:3].mean()
    assert torch.allclose(thor_consistency_loss(a, b, valid), ref3, atol=1e-6)


# ------------------------------------------------------------------ hyper_router
def test_hyper_router_weights_are_generated_by_the_frozen_hypernetwork():
    r = make("hyper_router", E=4, k=2, embed_dim=6, n_embeddings=3, hidden=5)
    assert [n for n, _ in r.named_parameters()] == ["embeddings"]
    h = torch.tanh(r.embeddings @ r.h_w1.t() + r.h_b1)
    w = (h @ r.h_w2.t() + r.h_b2).reshape(-1)[: 4 * D].view(4, D)
    assert torch.allclose(r.router_weight_ED(), w)
    x = torch.randn(10, D)
    res = r(x)
    assert torch.allclose(res.logits_TE, x @ w.t(), atol=1e-6)
    (res.weight_S * torch.linspace(0.5, 1.5, res.num_slots)).sum().backward()
    assert r.embeddings.grad is not None and r.embeddings.grad.abs().sum() > 0
    buffers = dict(r.named_buffers())
    w1 = buffers["h_w1"].clone()
    torch.optim.SGD(r.parameters(), lr=1.0).step()
    assert torch.equal(r.h_w1, w1)  # the hypernetwork never changes


# ------------------------------------------------------------------ stablemoe
def test_stablemoe_stage1_losses_follow_the_paper_formulas():
    r = make("stablemoe", E=4, k=1, stage1_steps=10, balance_alpha=0.3, vocab_size=50, distill_dim=5)
    x = torch.randn(12, D) * 20
    ids = torch.randint(0, 50, (12,))
    res = r(x, ids_ctx(ids))
    s = r.centroids(x).detach()
    a = s.argmax(-1)
    n_bar = 12 / 4
    load = torch.bincount(a, minlength=4).float()
    bal = 0.3 * sum(((load[e] - n_bar) / n_bar) * torch.sigmoid(s[a == e, e]).sum() for e in range(4)) / 12
    assert torch.allclose(res.aux_losses["stablemoe_balance"].detach(), bal, atol=1e-6)
    d = r.distilled_logits(ids).detach()
    assert torch.allclose(res.aux_losses["stablemoe_distill"].detach(), F.cross_entropy(d, a), atol=1e-6)
    assert torch.equal(res.expert_S, a)
    assert torch.allclose(res.weight_S.detach(), torch.sigmoid(s[torch.arange(12), a]))
    # the distillation loss never reaches the backbone router
    res.aux_losses["stablemoe_distill"].backward()
    assert r.centroids.weight_ED.grad is None and r.distill_emb.weight.grad is not None


def test_stablemoe_stage2_freezes_the_distilled_assignment():
    r = make("stablemoe", E=4, k=1, stage1_steps=2, vocab_size=50, distill_dim=5)
    ids = torch.randint(0, 50, (16,))
    for _ in range(2):
        r(torch.randn(16, D), ids_ctx(ids))
    assert r.stage == 2
    x = torch.randn(16, D)
    res = r(x, ids_ctx(ids))
    assert res.aux_losses == {}
    assert torch.equal(res.expert_S, r.distilled_logits(ids).argmax(-1))
    res.weight_S.sum().backward()
    assert r.distill_emb.weight.grad is None and r.distill_centroids.weight_ED.grad is None
    assert r.centroids.weight_ED.grad is not None  # the gate still trains
    with torch.no_grad():
        r.centroids.weight_ED.add_(torch.randn_like(r.centroids.weight_ED))
    again = r(torch.randn(16, D), ids_ctx(ids))  # new inputs, retrained backbone: same experts
    assert torch.equal(again.expert_S, res.expert_S)


def test_stablemoe_needs_token_ids():
    r = make("stablemoe")
    with pytest.raises(MoelabError, match="token_ids_T"):
        r(torch.randn(3, D))


def test_stablemoe_evaluation_always_uses_the_distilled_router():
    r = make("stablemoe", E=4, k=1, stage1_steps=100, vocab_size=50, distill_dim=5)
    ids = torch.randint(0, 50, (16,))
    r.eval()
    res = r(torch.randn(16, D) * 20, ids_ctx(ids))
    assert r.stage == 1 and res.aux_losses == {}
    assert torch.equal(res.expert_S, r.distilled_logits(ids).argmax(-1))

"""kmeans router (Ahrac, Hochwald & Geva 2026): centroids are running means of routed states."""

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routing import RoutingContext


def cfg(**kw):
    base = dict(d_model=8, d_ff=16, num_experts=4, k=1, router="kmeans")
    base.update(kw)
    return MoEConfig(**base)


def clustered(n_per, g, spread=0.3):
    """Four clusters along orthogonal directions; returns (x_TD, label_T, true means)."""
    means = torch.zeros(4, 8)
    for c in range(4):
        means[c, 2 * c] = 4.0
        means[c, 2 * c + 1] = 2.0
    label = torch.arange(4).repeat_interleave(n_per)
    x = means[label] + spread * torch.randn(4 * n_per, 8, generator=g)
    perm = torch.randperm(4 * n_per, generator=g)
    return x[perm], label[perm], means


def test_assignment_is_top_k_cosine_and_parameter_free():
    torch.manual_seed(0)
    r = build_router(cfg(k=2)).eval()
    assert len(list(r.parameters())) == 0
    x = torch.randn(7, 8)
    res = r(x).validate()
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(r.centroids_ED, dim=-1).t()
    for t in range(7):
        top = cos[t].topk(2)
        assert set(res.expert_S[res.token_S == t].tolist()) == set(top.indices.tolist())
        want = top.values.softmax(-1)
        got = res.dense_TE()[t, top.indices]
        assert torch.allclose(got, want, atol=1e-6)


def test_cumulative_centroid_is_exact_mean_of_routed_tokens():
    g = torch.Generator().manual_seed(1)
    r = build_router(cfg(k=2)).train()
    seen_sum = torch.zeros(4, 8, dtype=torch.float64)
    seen_n = torch.zeros(4, dtype=torch.float64)
    for _ in range(5):
        x = torch.randn(16, 8, generator=g)
        res = r(x)
        for t, e in zip(res.token_S.tolist(), res.expert_S.tolist()):
            seen_sum[e] += x[t].double()
            seen_n[e] += 1
    hit = seen_n > 0
    assert torch.allclose(r.centroids_ED[hit].double(), seen_sum[hit] / seen_n[hit, None], atol=1e-5)
    assert torch.equal(r.counts_E, seen_n.long())


@pytest.mark.parametrize("update", ["cumulative", "ema"])
def test_centroids_converge_to_cluster_means(update):
    g = torch.Generator().manual_seed(2)
    r = build_router(cfg(router_kwargs={"update": update, "decay": 0.9})).train()
    _, _, means = clustered(1, g)
    with torch.no_grad():  # start each centroid near (not at) one cluster, rotated off its axis
        r.centroids_ED.copy_(means + 1.5 * torch.randn(4, 8, generator=g))
    for _ in range(25):
        x, label, _ = clustered(16, g)
        res = r(x)
    assert torch.equal(res.expert_S, label[res.token_S])  # each cluster owns one expert
    tol = 0.1 if update == "cumulative" else 0.25
    assert (r.centroids_ED - means).norm(dim=-1).max() < tol


def test_padding_never_moves_a_centroid_and_eval_never_updates():
    g = torch.Generator().manual_seed(3)
    a = build_router(cfg()).train()
    b = build_router(cfg()).train()
    b.load_state_dict(a.state_dict())
    x, _, _ = clustered(8, g)
    junk = 1e3 * torch.randn(5, 8, generator=g)
    a(x)
    b(torch.cat([x, junk]), RoutingContext(valid_T=torch.tensor([True] * 32 + [False] * 5)))
    assert torch.allclose(a.centroids_ED, b.centroids_ED) and torch.equal(a.counts_E, b.counts_E)
    before = a.centroids_ED.clone()
    a.eval()
    a(junk)
    assert torch.equal(a.centroids_ED, before)
    a.train()
    with torch.no_grad():  # training mode but no grad (e.g. an eval loop without .eval()): no update
        a(x)
    assert torch.equal(a.centroids_ED, before)
    # an all-padding batch is a no-op too
    a(junk, RoutingContext(valid_T=torch.zeros(5, dtype=torch.bool)))
    assert torch.equal(a.centroids_ED, before)


def test_state_is_checkpointed():
    r = build_router(cfg()).train()
    r(torch.randn(10, 8))
    assert {"centroids_ED", "counts_E"} <= set(r.state_dict())


@pytest.mark.parametrize("kw", [{"update": "median"}, {"decay": 1.0}, {"temperature": 0.0}])
def test_bad_kwargs_raise(kw):
    with pytest.raises(MoelabError):
        build_router(cfg(router_kwargs=kw))

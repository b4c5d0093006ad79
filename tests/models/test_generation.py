"""Generation: the KV cache against the cache-free path (the full forward re-run every step) for every
causal router, logits of chunked cached forwards against one full forward, and the named errors of
``generate`` and ``forward`` (bad arguments, token ids outside the vocabulary, running past max_seq_len)."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import ROUTERS
from moelab.models.config import ModelConfig
from moelab.models.generation import KVCache
from moelab.models.transformer import MoETransformer

CAUSAL_ROUTERS = sorted(e.name for e in ROUTERS.entries() if getattr(e.obj, "causal", True))


def model_for(router: str = "softmax_topk", seed: int = 0, **moe_kw) -> MoETransformer:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=32, d_ff=24, num_experts=4, k=2, router=router, init_std=0.2, **moe_kw)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=24, d_ff_dense=48,
                      moe=moe, init_std=0.2)
    return MoETransformer(cfg).eval()


def expert_masks(model, run):
    """Run ``run()`` recording each MoE layer's chosen experts per call: {layer: [bool [T, E], ...]}."""
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in model.moe_layers():
        def hook(mod, args, out, i=i):
            r = mod.last_routing
            keep = torch.ones_like(r.token_S, dtype=torch.bool) if r.keep_S is None else r.keep_S
            m = torch.zeros(r.num_tokens, r.num_experts, dtype=torch.bool)
            m[r.token_S[keep], r.expert_S[keep]] = True
            seen.setdefault(i, []).append(m)
        hooks.append(layer.register_forward_hook(hook))
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return result, seen


def test_registry_has_causal_and_non_causal_routers():
    assert "softmax_topk" in CAUSAL_ROUTERS and "hash" in CAUSAL_ROUTERS
    assert "expert_choice" not in CAUSAL_ROUTERS  # needs the whole sequence


@pytest.mark.parametrize("router, kw", [(r, {}) for r in CAUSAL_ROUTERS]
                         + [("hash", {"router_kwargs": {"method": "bigram"}})])
def test_cached_greedy_equals_cache_free_tokens_and_experts(router, kw):
    model = model_for(router, **kw)
    prompt_BL = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 8
    cached_BL, seen = expert_masks(model, lambda: model.generate(prompt_BL, n, temperature=0))
    free_BL = model.generate(prompt_BL, n, temperature=0, use_cache=False)
    assert torch.equal(cached_BL, free_BL)
    # every token's experts while decoding == what one full forward of the fed positions chose
    _, full = expert_masks(model, lambda: model(cached_BL[:, :-1]))
    for i, calls in seen.items():
        B = prompt_BL.shape[0]
        per_pos = [calls[0].view(B, 5, -1)] + [m.view(B, 1, -1) for m in calls[1:]]
        assert torch.equal(torch.cat(per_pos, dim=1), full[i][0].view(B, 5 + n - 1, -1)), f"layer {i}"


def test_chunked_cached_forward_matches_full_forward_logits():
    model = model_for()
    ids_BL = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    full_BLV = model(ids_BL).logits
    cache = KVCache.for_model(model, batch=3)
    parts = [model(ids_BL[:, a:b], kv_cache=cache).logits for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full_BLV, atol=1e-5, rtol=1e-5)


def test_cached_sampling_equals_cache_free_sampling_with_one_seed():
    model = model_for()
    prompt_BL = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    draw = lambda cache: model.generate(prompt_BL, 10, temperature=1.0, top_k=5, use_cache=cache,  # noqa: E731
                                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(draw(True), draw(False))


def test_top_k_one_is_greedy():
    model = model_for()
    prompt_BL = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt_BL, 6, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, model.generate(prompt_BL, 6, temperature=0))


def test_generation_past_max_seq_len_is_refused_with_the_limit_named():
    model = model_for()  # max_seq_len 24
    with pytest.raises(MoelabError, match=r"max_seq_len=24.*at most 4"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 5, temperature=0)
    assert model.generate(torch.zeros(1, 20, dtype=torch.long), 4, temperature=0).shape == (1, 24)


def test_sliding_window_continues_with_the_last_max_seq_len_tokens():
    model = model_for()
    prompt_BL = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt_BL, 9, temperature=0, sliding_window=True)
    assert out.shape == (2, 29)
    ids = prompt_BL  # oracle: a loop over full forwards of the last 24 tokens
    for _ in range(9):
        ids = torch.cat([ids, model(ids[:, -24:]).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_eos_stops_when_every_row_is_done():
    model = model_for()
    prompt_BL = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(6))
    free = model.generate(prompt_BL, 10, temperature=0)
    eos = int(free[0, 6])  # the third generated token
    out = model.generate(prompt_BL, 10, temperature=0, eos_id=eos)
    first = (free[0, 4:] == eos).nonzero()[0].item()
    assert torch.equal(out, free[:, : 4 + first + 1])


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5"),
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_k": 0}, "top_k=0"),
    ({"top_k": -3}, "top_k=-3"),
    ({"eos_id": 64}, "eos_id=64"),
])
def test_bad_generate_arguments_are_named(kwargs, match):
    model = model_for()
    args = {"max_new_tokens": 3, **kwargs}
    n = args.pop("max_new_tokens")
    with pytest.raises(MoelabError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), n, **args)


@pytest.mark.parametrize("ids, match", [
    (torch.zeros(3, dtype=torch.long), r"input_ids_BL=\(3,\)"),
    (torch.zeros(1, 0, dtype=torch.long), "length 0"),
    (torch.zeros(1, 3), "integer tensor"),
])
def test_bad_prompts_are_named(ids, match):
    with pytest.raises(MoelabError, match=match):
        model_for().generate(ids, 2)


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_token_id_outside_the_vocabulary_is_named(bad):
    model = model_for()
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(MoelabError, match=rf"token id {bad} .*vocab_size=64"):
        model(ids)
    with pytest.raises(MoelabError, match=rf"token id {bad}"):
        model.generate(ids, 2)


def test_cache_overflow_is_refused():
    model = model_for()
    cache = KVCache.for_model(model, batch=1, capacity=4)
    model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(MoelabError, match="3 of 4 positions; 2 more"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


def test_generate_restores_moe_statistics_for_later_forwards():
    model = model_for()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=0)
    model(torch.zeros(1, 3, dtype=torch.long))
    assert all(layer.track_stats and layer.last_stats["counts"] for _, layer in model.moe_layers())


@pytest.mark.parametrize("layout_kw, model_kw", [
    ({"kind": "shared_pool"}, {}),
    ({"kind": "shared_pool", "router_sharing": "decision"}, {}),
    ({}, {"n_layers": 3, "first_k_dense": 1}),
])
def test_cached_generation_with_pools_shared_routers_and_dense_blocks(layout_kw, model_kw):
    from moelab.layers.layouts import LayoutConfig

    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=24, num_experts=4, k=2, init_std=0.2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=model_kw.get("n_layers", 2), n_heads=4, max_seq_len=24,
                      d_ff_dense=48, moe=moe, init_std=0.2, first_k_dense=model_kw.get("first_k_dense", 0),
                      layout=LayoutConfig(**layout_kw))
    model = MoETransformer(cfg).eval()
    prompt_BL = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(model.generate(prompt_BL, 8, temperature=0),
                       model.generate(prompt_BL, 8, temperature=0, use_cache=False))

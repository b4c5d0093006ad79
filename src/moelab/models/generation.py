"""Autoregressive generation for ``MoETransformer``: an attention key/value cache and the sampler.

**KV cache** (incremental decoding, as in every decoder-only LM since the Transformer; the same
layout as Hugging Face's ``StaticCache``): each attention layer keeps the rotated keys and the values
of every position already processed, so a new token costs one query against the cached keys instead
of a forward over the whole context. ``KVCache`` holds one ``[B, H, C, Dh]`` buffer pair per block
(C = capacity, at most ``max_seq_len``), allocated on the first write in the dtype attention produces.

**Routing is not cached.** Each new token is routed from its own hidden state, exactly as the full
forward routes it; routers that read later tokens (expert-choice, SMEAR sequence merges, BIP,
Sinkhorn/BASE in training) are not causal and cannot be decoded token by token. The one router that
reads an earlier token, the bigram hash, gets the previous token id from the cache
(``RoutingContext.prev_token_ids_B``). ``tests/models/test_generation.py`` checks, for every causal
router of the registry, that cached greedy decoding picks the same tokens and the same experts for
every token as the cache-free path (the full forward re-run each step).

**Sequence length.** RoPE tables and the trained positions end at ``max_seq_len``. ``generate``
raises a ``MoelabError`` when prompt + new tokens would exceed it, unless ``sliding_window=True``:
then, once the context is full, each further token is predicted from the last ``max_seq_len``
tokens re-run without the cache at positions 0..max_seq_len-1 (what the cache-free loop always did).

Shape legend: B batch, L new positions, H heads, C cache capacity, Dh head dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from moelab.errors import MoelabError, check_range


class KVCache:
    """Keys and values of the positions processed so far, one buffer pair per block.

    ``length`` positions are filled; a forward with ``kv_cache=`` writes its L new positions at
    ``length .. length+L-1`` in every block (``update``) and then calls ``advance`` once.
    ``last_ids_B`` is the token id of each row's last cached position (None before the first).
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int) -> None:
        self.shape = (batch, n_heads, capacity, head_dim)
        self.capacity = capacity
        self.length = 0
        self.last_ids_B: Tensor | None = None
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.extra: dict = {}  # per-sequence state kept across steps (depth routers' decisions, moelab.models.depth)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int | None = None) -> KVCache:
        """A cache for ``model`` (an ``MoETransformer``) of ``capacity`` positions (default max_seq_len)."""
        cfg = model.cfg
        cap = cfg.max_seq_len if capacity is None else int(check_range("capacity", capacity, low=1,
                                                                        high=cfg.max_seq_len))
        slots = model.kv_slots() if hasattr(model, "kv_slots") else cfg.n_layers  # repeated blocks get a slot
        return cls(slots, batch, cfg.n_heads, cfg.d_model // cfg.n_heads, cap)

    def check_room(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise MoelabError(f"KV cache holds {self.length} of {self.capacity} positions; {new} more do not fit "
                              f"(capacity is at most model.max_seq_len)")

    def update(self, layer: int, k_BHLDh: Tensor, v_BHLDh: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values of ``layer``; return all ``length + L`` cached ones."""
        if self.k[layer] is None:
            self.k[layer] = k_BHLDh.new_empty(self.shape)
            self.v[layer] = v_BHLDh.new_empty(self.shape)
        p, L = self.length, k_BHLDh.shape[2]
        self.k[layer][:, :, p : p + L] = k_BHLDh
        self.v[layer][:, :, p : p + L] = v_BHLDh
        return self.k[layer][:, :, : p + L], self.v[layer][:, :, : p + L]

    def advance(self, ids_BL: Tensor) -> None:
        """Mark the forward's ``L`` positions (token ids ``ids_BL``) as cached."""
        self.length += ids_BL.shape[1]
        self.last_ids_B = ids_BL[:, -1]


@contextmanager
def untracked_moe_layers(model) -> Iterator[None]:
    """Turn off each MoE layer's ``last_stats``/``last_aux`` bookkeeping (``MoELayer.track_stats``) while
    decoding: statistics of one token per step are of no use and cost ~15% of a decode step."""
    from moelab._patch import temporarily

    with temporarily([m for m in model.modules() if hasattr(m, "track_stats")], "track_stats", False):
        yield


def check_generate_args(input_ids_BL, max_new_tokens, temperature, top_k, eos_id, vocab_size: int) -> None:
    """Named errors for every argument of ``MoETransformer.generate``."""
    if not isinstance(input_ids_BL, Tensor) or input_ids_BL.dim() != 2 or input_ids_BL.is_floating_point():
        got = tuple(input_ids_BL.shape) if isinstance(input_ids_BL, Tensor) else type(input_ids_BL).__name__
        raise MoelabError(f"input_ids_BL={got} is not valid; expected an integer tensor [batch, length]")
    if input_ids_BL.shape[1] == 0:
        raise MoelabError("input_ids_BL has length 0; generation needs at least one prompt token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise MoelabError(f"max_new_tokens={max_new_tokens!r} is not valid; expected an int >= 0")
    check_range("max_new_tokens", max_new_tokens, low=0)
    if not isinstance(temperature, (int, float)) or temperature != temperature:
        raise MoelabError(f"temperature={temperature!r} is not valid; expected a number >= 0 (0 = greedy)")
    check_range("temperature", temperature, low=0.0)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise MoelabError(f"top_k={top_k!r} is not valid; expected None or an int >= 1")
        check_range("top_k", top_k, low=1)
    if eos_id is not None:
        check_range("eos_id", eos_id, low=0, high=vocab_size - 1)


def plan_length(prompt_len: int, max_new_tokens: int, max_seq_len: int, sliding_window: bool) -> None:
    """Refuse a generation that would run past ``max_seq_len`` (unless ``sliding_window``)."""
    if sliding_window or prompt_len + max_new_tokens <= max_seq_len:
        return
    raise MoelabError(f"prompt length {prompt_len} + max_new_tokens={max_new_tokens} exceeds model.max_seq_len="
                      f"{max_seq_len}; shorten the prompt, lower max_new_tokens to at most "
                      f"{max(0, max_seq_len - prompt_len)}, or pass sliding_window=True")


def sample_next(logits_BV: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> Tensor:
    """The next token of each row: argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the ``top_k`` most likely tokens."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)

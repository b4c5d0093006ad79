"""What every depth router shares: forced decisions, the prompt prefix, per-sequence decisions kept in the KV cache.

A depth router sits in ``Block.depth`` and runs the block (``Block.attn_residual`` / ``Block.ffn_residual``,
the very ops of the unmodified block) as its decisions say. Decisions are applied by selecting, per sequence
or per token, between the block's output and its input (``torch.where``), so with every decision "execute"
the output is the unmodified block's, bit for bit. Compute the decisions save is *counted* (``last_action``),
not removed from the wall clock, except where a whole batch skips a sub-layer (then it is not run at all).

Causality and the KV cache. Per-sequence routers (Dr.LLM, MindSkip "sequence") read only the first
``prefix`` positions (the prompt: ``route_prefix``; ``generate`` sets it to the prompt length; None = every
position of the forward) and, with a KV cache, decide on the first forward (the prefill) and keep that
decision in ``KVCache.extra`` for every later token, so cached decoding equals re-running the full
context with the same prefix (``generate`` with ``sliding_window`` past ``max_seq_len``: the window's first
``prefix`` tokens decide, a documented approximation). Per-token routers (MindSkip "token", Duo) read each
token's own hidden state. Without a prefix (a plain full-window forward, e.g. ``moelab eval``), a per-sequence
router reads the whole window, so its one decision per block has seen the window's later tokens (not causal
within the window); ``moelab depth-route`` scores continuations with prompt-only decisions.
"""

from __future__ import annotations

from torch import Tensor, nn


class DepthRouter(nn.Module):
    """Base: ``forced`` (None, an int, or a tensor broadcastable to the decision shape) overrides the
    router; ``prefix`` limits what per-sequence routers read; ``last_action`` holds the last decisions."""

    repeats = False  # whether the block may run twice (needs its own KV-cache slot)

    def __init__(self, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.prefix: int | None = None
        self.forced: Tensor | int | None = None
        self.last_action: Tensor | None = None

    def choose_sequence(self, x_BLD: Tensor) -> Tensor:  # pragma: no cover - per-sequence routers override
        raise NotImplementedError

    def sequence_action(self, x_BLD: Tensor, kv_cache, dtype=None) -> Tensor:
        """``[B]`` decisions from the prompt prefix, kept in the KV cache after the first forward."""
        key = ("depth", self.layer_index)
        if kv_cache is not None and key in kv_cache.extra:
            return kv_cache.extra[key]
        B, L = x_BLD.shape[:2]
        if self.forced is not None:
            a_B = _forced(self.forced, (B,), x_BLD.device)
        else:
            a_B = self.choose_sequence(x_BLD[:, : min(L, self.prefix or L)])
        if kv_cache is not None:
            kv_cache.extra[key] = a_B
        return a_B


def _forced(value, shape: tuple[int, ...], device) -> Tensor:
    import torch

    t = value if isinstance(value, Tensor) else torch.tensor(value)
    return t.to(device).expand(shape) if t.dim() <= len(shape) else t.to(device)


def forced_tokens(value, B: int, L: int, device) -> Tensor:
    """``forced`` as ``[B, L]`` decisions (an int, ``[B]``, ``[B, 1]`` or ``[B, L]``)."""
    import torch

    t = value if isinstance(value, Tensor) else torch.tensor(value)
    t = t.to(device)
    if t.dim() == 1:
        t = t[:, None]
    return t.expand(B, L)


def rows(mask_B: Tensor) -> Tensor:
    """``[B]`` bool -> ``[B, 1, 1]`` for selecting whole sequences of ``[B, L, D]``."""
    return mask_B[:, None, None]

"""MindSkip: a router per attention block decides to skip it (Router-Tuning trains only these routers).

He, Liu, et al. 2024, "Router-Tuning: A Simple and Effective Approach for Enabling Dynamic-Depth in
Transformers" (arXiv 2410.13184), as in the official code (CASE-Lab-UMD/Router-Tuning-Mixture-of-Depths,
``utils/model/model_patch.py``): the router is ``Linear(D, 1, bias=False)`` on the attention block's normed
input, mean-pooled over the sequence for "sequence" granularity (the official default ``attn_sequence``) or
per token ("token"); score = sigmoid(logit); the attention output is kept where score >= ``threshold`` (0.5)
and dropped (residual passthrough) elsewhere. In training the 0/1 mask passes its gradient straight through to
the score (STE), so the routers learn from the LM loss; the FFN always runs.

Skipped tokens and the KV cache (ours, documented): as in the official code, attention is still computed for a
token whose attention output is dropped, so its keys/values (from its own input) stay visible to later tokens;
cached decoding therefore equals full recomputation. A "sequence" decision is made from the prompt prefix and
kept (``base.DepthRouter.sequence_action``); when a whole batch skips, attention is not run at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.models.depth.base import DepthRouter, forced_tokens


class MindSkipRouter(DepthRouter):
    def __init__(self, d_model: int, layer_index: int, *, granularity: str = "sequence", threshold: float = 0.5) -> None:
        super().__init__(layer_index)
        self.granularity, self.threshold = granularity, float(threshold)
        self.gate = nn.Linear(d_model, 1, bias=False)
        self.last_scores: Tensor | None = None

    def scores(self, h_BLD: Tensor) -> Tensor:
        """sigmoid router scores: ``[B, 1]`` (sequence: mean over the positions given) or ``[B, L]`` (token)."""
        pooled = h_BLD.mean(1, keepdim=True) if self.granularity == "sequence" else h_BLD
        return torch.sigmoid(self.gate(pooled).squeeze(-1))

    def choose_sequence(self, h_BLD: Tensor) -> Tensor:
        return (self.scores(h_BLD)[:, 0] >= self.threshold).long()

    def mask(self, h_BLD: Tensor, kv_cache) -> Tensor:
        """``[B, 1]`` or ``[B, L]`` 0/1 keep-mask (float; straight-through gradient to the score in training)."""
        B, L = h_BLD.shape[:2]
        if self.forced is not None:
            shape_L = 1 if self.granularity == "sequence" else L
            return forced_tokens(self.forced, B, shape_L, h_BLD.device).to(h_BLD.dtype)
        if self.granularity == "sequence" and not (self.training and torch.is_grad_enabled()):
            return self.sequence_action(h_BLD, kv_cache)[:, None].to(h_BLD.dtype)
        s = self.scores(h_BLD[:, : min(L, self.prefix or L)] if self.granularity == "sequence" else h_BLD)
        self.last_scores = s
        hard = (s >= self.threshold).to(s.dtype)
        return hard + s - s.detach()  # STE: forward 0/1, gradient d mask / d score = 1 (official STEFunction)

    def forward(self, block, x_BLD: Tensor, cos_LDh: Tensor, sin_LDh: Tensor, ctx, kv_cache=None) -> Tensor:
        h_BLD = block.attn_norm(x_BLD)
        m_BL = self.mask(h_BLD, kv_cache)
        self.last_action = m_BL.detach()
        grad = torch.is_grad_enabled() and m_BL.requires_grad
        if not grad and bool((m_BL == 1).all()):
            x1_BLD = block.attn_residual(x_BLD, cos_LDh, sin_LDh, kv_cache)  # the unmodified block's ops
        elif not grad and self.granularity == "sequence" and bool((m_BL == 0).all()):
            x1_BLD = x_BLD  # the whole batch skips: attention is not run (no STE gradient needed)
        else:
            kv = None if kv_cache is None else (kv_cache, block.layer_index)
            x1_BLD = x_BLD + block.attn(h_BLD, cos_LDh, sin_LDh, kv) * m_BL[..., None]
        return block.ffn_residual(x1_BLD, ctx)

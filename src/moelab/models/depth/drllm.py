"""Dr.LLM's per-layer router: skip, execute or repeat the block, once per input sequence.

Heakl, Gubri, Khan, Yun & Oh 2025, "Dr.LLM: Dynamic Layer Routing in LLMs" (arXiv 2510.12773). Each block
gets a small bottleneck MLP (Linear D->h, GELU, Linear h->3) that reads *windowed mean pooling* of the block's
input hidden states: the prompt positions are cut into ``windows`` contiguous windows, each is mean-pooled,
the MLP scores each window and the logits are averaged (the paper's stabilised router input for long
sequences). The decision (0 skip, 1 execute, 2 repeat = run the block twice) holds for the whole sequence,
made once from the prompt and kept for generated tokens (KV-cache compatible, as in the paper).

Choices (ours, documented): the pooled hidden states are RMS-normalised without weights (scale-free router
input); the last layer starts at weight 0, bias (0, 1, 0), so an untrained router executes every block (the
unmodified model); a repeated pass writes its keys/values to its own KV-cache slot; the MoE layer's router
sees the block's ``layer_index`` on both passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.models.depth.base import DepthRouter, rows

SKIP, EXECUTE, REPEAT = 0, 1, 2


class DrLLMRouter(DepthRouter):
    repeats = True

    def __init__(self, d_model: int, layer_index: int, repeat_slot: int, *, hidden: int = 128, windows: int = 8) -> None:
        super().__init__(layer_index)
        self.repeat_slot, self.windows = repeat_slot, int(windows)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 3))
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))

    def pooled(self, x_BPD: Tensor) -> Tensor:
        """``[B, W, D]``: RMS-normalised means of ``W = min(windows, P)`` contiguous windows of the positions."""
        chunks = torch.tensor_split(x_BPD, min(self.windows, x_BPD.shape[1]), dim=1)
        m_BWD = torch.stack([c.mean(1) for c in chunks], dim=1)
        return F.rms_norm(m_BWD, (m_BWD.shape[-1],))

    def logits(self, pooled_BWD: Tensor) -> Tensor:
        """``[B, 3]`` router logits: the MLP on each window, averaged over windows."""
        return self.mlp(pooled_BWD).mean(1)

    def choose_sequence(self, x_BLD: Tensor) -> Tensor:
        return self.logits(self.pooled(x_BLD)).argmax(-1)

    def forward(self, block, x_BLD: Tensor, cos_LDh: Tensor, sin_LDh: Tensor, ctx, kv_cache=None) -> Tensor:
        a_B = self.sequence_action(x_BLD, kv_cache)
        self.last_action = a_B
        if bool((a_B == SKIP).all()):
            return x_BLD
        y_BLD = block.ffn_residual(block.attn_residual(x_BLD, cos_LDh, sin_LDh, kv_cache), ctx)
        if bool((a_B == REPEAT).any()):
            y2_BLD = block.ffn_residual(block.attn_residual(y_BLD, cos_LDh, sin_LDh, kv_cache, slot=self.repeat_slot), ctx)
            y_BLD = torch.where(rows(a_B == REPEAT), y2_BLD, y_BLD)
        if bool((a_B == SKIP).any()):
            y_BLD = torch.where(rows(a_B == SKIP), x_BLD, y_BLD)
        return y_BLD

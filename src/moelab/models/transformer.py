"""A LLaMA-style decoder-only transformer whose FFN blocks are dense SwiGLU or MoE layers.

Read top to bottom: RMSNorm -> RoPE -> Attention -> DenseFFN -> Block -> MoETransformer.

Architecture (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"):
pre-norm residual blocks with RMSNorm (Zhang & Sennrich 2019), rotary position embeddings
(Su et al. 2021, "RoFormer"), causal multi-head attention through
``F.scaled_dot_product_attention`` and SwiGLU feed-forward blocks (Shazeer 2020, "GLU Variants
Improve Transformer"). Each block's FFN is either dense or a ``moelab.layers.moe.MoELayer``
(chosen by ``ModelConfig.moe_layers`` / ``first_k_dense``), as in Mixtral and DeepSeekMoE.

Initialisation (our choice, documented): embeddings and every linear weight ~ N(0, init_std);
the two residual-output projections of each block (attention ``o_proj`` and the dense FFN's
``w_down``) ~ N(0, init_std / sqrt(2 * n_layers)) (GPT-2's scaled residual init); RMSNorm
weights 1. MoE layers initialise themselves (``MoEConfig.init_std``). With
``tie_embeddings`` the output head reuses the embedding matrix.

CPU speed choices: fused QKV projection, fused gate/up projection, ``F.rms_norm``, RoPE applied
to q and k in one op, no dtype casts in the forward (autocast decides), and a cross-entropy
(``lm_cross_entropy``) that keeps no ``[T, V]`` log-softmax copy and writes its gradient into
one buffer (about 2x faster than ``F.cross_entropy`` fwd+bwd at T=2048, V=4096, and 20% less peak
memory for the ``tiny`` training step).

Shape legend: B batch, L sequence length, D model dim, H heads, Dh head dim, V vocab, T = B*L
tokens, F FFN hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.config import MoEConfig
from moelab.layers.routing import RoutingContext
from moelab.models.causality import require_causal
from moelab.models.config import ModelConfig


@dataclass
class ModelOutput:
    """``loss`` = ``lm_loss`` + ``aux_loss`` in value; its gradient is that of the full objective.

    The balance losses reach the gradient through the autograd function each MoE layer attaches
    to its output, so ``loss`` adds ``aux_loss`` *detached* (for reporting only): backpropagating
    ``loss`` never counts the balance losses twice. ``aux_loss`` is the sum of every MoE
    layer's ``last_aux`` values.
    """

    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): x / rms(x) * weight, no centring."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoFormer's rotation angles, laid out for the rotate-half form: cos/sin ``[L, Dh]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles_LH = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles_LDh = torch.cat([angles_LH, angles_LH], dim=-1)
    return angles_LDh.cos().float(), angles_LDh.sin().float()


def apply_rope(x: Tensor, cos_LDh: Tensor, sin_LDh: Tensor) -> Tensor:
    """Rotate pairs (i, i + Dh/2) of the last dim by position-dependent angles (rotate-half form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos_LDh + rotated * sin_LDh


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings and a fused QKV projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BLD: Tensor, cos_LDh: Tensor, sin_LDh: Tensor, kv: tuple | None = None) -> Tensor:
        """``kv = (KVCache, layer_index)``: the L positions continue the cached ones (generation)."""
        B, L, D = x_BLD.shape
        qkv_3BHLDh = self.qkv(x_BLD).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = 0 if kv is None else kv[0].length
        qk_2BHLDh = apply_rope(qkv_3BHLDh[:2], cos_LDh[p : p + L], sin_LDh[p : p + L])
        q_BHLDh, k_BHLDh, v_BHLDh = qk_2BHLDh[0], qk_2BHLDh[1], qkv_3BHLDh[2]
        mask_LP = None
        if kv is not None:
            k_BHLDh, v_BHLDh = kv[0].update(kv[1], k_BHLDh, v_BHLDh)  # now all p + L positions
            if p > 0 and L > 1:  # a chunk after cached positions: query i sees keys 0 .. p + i
                mask_LP = torch.ones(L, p + L, dtype=torch.bool, device=x_BLD.device).tril(p)
        causal = mask_LP is None and (p == 0 and L > 1)
        y_BHLDh = F.scaled_dot_product_attention(q_BHLDh, k_BHLDh, v_BHLDh, attn_mask=mask_LP, is_causal=causal)
        return self.o_proj(y_BHLDh.transpose(1, 2).reshape(B, L, D))


class DenseFFN(nn.Module):
    """SwiGLU feed-forward block: w_down(silu(x w_gate) * (x w_up)), gate and up fused."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class _LMCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target is not -100; same value and gradient as
    ``F.cross_entropy(logits_TV, targets_T, ignore_index=-100)``, less memory and time on CPU.

    ``F.cross_entropy`` keeps a ``[T, V]`` log-softmax copy for backward, and its backward
    allocates a zero-filled ``[T, V]`` nll gradient plus a ``[T, V]`` log-softmax gradient. Here,
    when the logits need a gradient, forward writes the gradient of the mean loss,
    ``(softmax - onehot) / n`` on valid rows, straight into one ``[T, V]`` buffer, in row chunks of
    ``CHUNK_ELEMS`` elements so that each chunk's max/sub/exp/sum/scale passes stay in cache (the
    fused-gradient trick of Liger-Kernel's fused linear cross-entropy, without fusing the matmul);
    backward only scales that buffer by the incoming gradient (in place: backward runs once).
    Without a gradient, the log-sum-exp reuses one chunk buffer. No ``[T, V]`` temporaries either
    way. Rows all ignored: the loss is NaN (0/0, as ``F.cross_entropy``) and the gradient zero.
    """

    CHUNK_ELEMS = 1 << 18  # elements per row chunk: 1 MiB of fp32, about the size of a core's L2

    @staticmethod
    def forward(ctx, logits_TV: Tensor, targets_T: Tensor) -> Tensor:  # type: ignore[override]
        T, V = logits_TV.shape
        valid_T = targets_T != -100
        safe_T = targets_T.masked_fill(~valid_T, 0)
        n = valid_T.sum()
        want_grad = ctx.needs_input_grad[0]
        rows = max(1, _LMCrossEntropy.CHUNK_ELEMS // max(V, 1))
        out_TV = torch.empty_like(logits_TV) if want_grad else logits_TV.new_empty(min(rows, T), V)
        scale_T = valid_T.to(logits_TV.dtype) / n.clamp_min(1)
        lse_T = logits_TV.new_empty(T)
        for i in range(0, T, rows):
            x_CV = logits_TV[i : i + rows]
            buf_CV = out_TV[i : i + rows] if want_grad else out_TV[: x_CV.shape[0]]
            m_C1 = x_CV.amax(-1, keepdim=True)
            m_C1 = m_C1.masked_fill(~torch.isfinite(m_C1), 0.0)
            torch.sub(x_CV, m_C1, out=buf_CV).exp_()
            s_C1 = buf_CV.sum(-1, keepdim=True)
            lse_T[i : i + rows] = (m_C1 + s_C1.log()).squeeze(1)
            if want_grad:
                buf_CV.mul_(scale_T[i : i + rows, None] / s_C1)  # softmax / n on valid rows, 0 elsewhere
        tgt_T = logits_TV.gather(1, safe_T[:, None]).squeeze(1)
        loss = torch.where(valid_T, lse_T - tgt_T, 0.0).sum() / n
        if want_grad:
            out_TV.scatter_add_(1, safe_T[:, None], -scale_T[:, None])  # minus the one-hot / n
            ctx.save_for_backward(out_TV)
            ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("lm_cross_entropy: backward ran twice through one loss (retain_graph is not "
                               "supported: the gradient buffer is scaled in place)")
        ctx.consumed = True
        (grad_TV,) = ctx.saved_tensors
        return grad_TV.mul_(g), None


def lm_cross_entropy(logits_TV: Tensor, targets_T: Tensor) -> Tensor:
    """Mean next-token cross-entropy ignoring label -100 (``_LMCrossEntropy``)."""
    return _LMCrossEntropy.apply(logits_TV, targets_T)


def _default_moe_factory(cfg: MoEConfig) -> nn.Module:
    from moelab.layers.moe import MoELayer  # imported lazily: the layer lives in moelab.layers

    return MoELayer(cfg)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn dense or MoE.

    An MoE layer whose ``block_residual`` is False returns the new residual stream itself
    (Chain-of-Experts ``residual="inner"``): the block then outputs ``ffn(norm(x))`` without ``x``.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int, moe: nn.Module | None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = moe is not None
        self.ffn = moe if moe is not None else DenseFFN(cfg.d_model, cfg.d_ff_dense)
        self.depth = None  # a depth router (moelab.models.depth) that decides how this block runs; None: always run

    def forward(self, x_BLD: Tensor, cos_LDh: Tensor, sin_LDh: Tensor, ctx: RoutingContext,
                kv_cache=None) -> Tensor:
        if self.depth is not None:
            return self.depth(self, x_BLD, cos_LDh, sin_LDh, ctx, kv_cache)
        return self.ffn_residual(self.attn_residual(x_BLD, cos_LDh, sin_LDh, kv_cache), ctx)

    def attn_residual(self, x_BLD: Tensor, cos_LDh: Tensor, sin_LDh: Tensor, kv_cache=None,
                      slot: int | None = None) -> Tensor:
        """``x + attn(norm(x))``; ``slot``: the KV-cache slot (default the block's index; a repeated pass uses another)."""
        kv = None if kv_cache is None else (kv_cache, self.layer_index if slot is None else slot)
        return x_BLD + self.attn(self.attn_norm(x_BLD), cos_LDh, sin_LDh, kv)

    def ffn_residual(self, x_BLD: Tensor, ctx: RoutingContext) -> Tensor:
        """``x + ffn(norm(x))`` (an inner-residual MoE layer returns its output alone)."""
        h_BLD = self.ffn_norm(x_BLD)
        if self.is_moe:
            B, L, D = h_BLD.shape
            y_BLD = self.ffn(h_BLD.reshape(B * L, D), replace(ctx, layer_index=self.layer_index)).view(B, L, D)
            return x_BLD + y_BLD if getattr(self.ffn, "block_residual", True) else y_BLD
        return x_BLD + self.ffn(h_BLD)


class MoETransformer(nn.Module):
    """Decoder-only language model; see the module docstring.

    ``moe_factory(cfg: MoEConfig) -> nn.Module`` builds each MoE layer (default:
    ``moelab.layers.moe.MoELayer``); it is the seam for custom layers and test stand-ins.
    """

    def __init__(self, cfg: ModelConfig, moe_factory: Callable[[MoEConfig], nn.Module] | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        factory = moe_factory or _default_moe_factory
        moe_idx = set(cfg.moe_layer_indices())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.expert_layout = None  # owner of shared expert banks (UniPool, ReXMoE); None for per-layer experts
        if moe_factory is not None and not cfg.layout.is_vanilla():
            from moelab.errors import MoelabError

            raise MoelabError(f"moe_factory cannot build model.layout.kind={cfg.layout.kind!r} (schedule "
                              f"{cfg.layout.schedule!r}); use the default MoE layers or the vanilla layout")
        if not cfg.layout.is_vanilla():
            from moelab.layers.pool import build_layout

            self.expert_layout, moe = build_layout(cfg.layout, cfg.layer_moe_config(), sorted(moe_idx))
            self.blocks = nn.ModuleList(Block(cfg, i, moe.get(i)) for i in range(cfg.n_layers))
        else:
            self.blocks = nn.ModuleList(
                Block(cfg, i, factory(cfg.layer_moe_config(i)) if i in moe_idx else None) for i in range(cfg.n_layers)
            )
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.depth:  # depth routers (moelab.models.depth): built from the config, their weights load with the rest
            from moelab.models.depth import install_depth

            install_depth(self, cfg.depth)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The documented init (module docstring); MoE layers keep their own init."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.o_proj.weight, std=out_std)
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
            if not block.is_moe:
                nn.init.normal_(block.ffn.w_gate_up.weight, std=std)
                nn.init.normal_(block.ffn.w_down.weight, std=out_std)
        self.final_norm.weight.fill_(1.0)

    # ------------------------------------------------------------------ structure
    def kv_slots(self) -> int:
        """KV-cache slots: one per block, plus one per block whose depth router may repeat it."""
        return self.cfg.n_layers + sum(getattr(b.depth, "repeats", False) for b in self.blocks)

    def moe_layers(self) -> Iterator[tuple[int, nn.Module]]:
        """Yield ``(block index, MoE layer)`` for every MoE block."""
        for block in self.blocks:
            if block.is_moe:
                yield block.layer_index, block.ffn

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: ``total`` and ``active`` (used per token: routed experts count k/E).

        Routed-expert parameters are those of each MoE layer's ``experts`` (a shared pool counted
        once); a token uses ``k`` of its layer's ``num_experts`` experts in every MoE layer (the
        nominal k for variable-k routers; an expert reused by two layers counts twice, like its
        FLOPs: ``moelab.layers.pool.routed_param_counts``). Embedding and output head are included
        in both counts (tied: counted once).
        """
        from moelab.layers.pool import routed_param_counts

        total = sum(p.numel() for p in self.parameters())
        routed = routed_param_counts([layer for _, layer in self.moe_layers()])
        inactive = routed["total"] - routed["active"]
        embedding = self.embed.weight.numel()
        return {"total": total, "active": total - inactive, "embedding": embedding}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids_BL: Tensor, labels_BL: Tensor | None = None, valid_BL: Tensor | None = None,
                *, kv_cache=None) -> ModelOutput:
        """Logits for every position; with ``labels_BL`` (already shifted: the target of position
        l is ``labels_BL[:, l]``) also the mean next-token cross-entropy over positions where
        ``valid_BL`` is True and the label is not -100. With ``kv_cache`` (a
        ``moelab.models.generation.KVCache``) the positions continue the cached ones (generation)."""
        B, L = input_ids_BL.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + L > self.cfg.max_seq_len:
            from moelab.errors import MoelabError

            raise MoelabError(f"sequence length {start + L} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None:
            kv_cache.check_room(L)
        ctx = RoutingContext(
            valid_T=None if valid_BL is None else valid_BL.reshape(-1),
            batch_shape=(B, L),
            token_ids_T=input_ids_BL.reshape(-1),
            state={},
            prev_token_ids_B=None if kv_cache is None else kv_cache.last_ids_B,
        )
        x_BLD = self.embed_tokens(input_ids_BL)
        for block in self.blocks:
            x_BLD = block(x_BLD, self.rope_cos, self.rope_sin, ctx, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids_BL)
        h_BLD = self.final_norm(x_BLD)
        weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BLV = F.linear(h_BLD, weight_VD)
        if labels_BL is None:
            return ModelOutput(logits=logits_BLV)
        targets_BL = labels_BL if valid_BL is None else labels_BL.masked_fill(~valid_BL.bool(), -100)
        lm_loss = lm_cross_entropy(logits_BLV.reshape(B * L, -1).float(), targets_BL.reshape(-1))
        aux_loss = self.last_aux_loss(lm_loss)
        return ModelOutput(logits=logits_BLV, loss=lm_loss + aux_loss, lm_loss=lm_loss, aux_loss=aux_loss)

    def embed_tokens(self, input_ids_BL: Tensor) -> Tensor:
        """Token embeddings; a token id outside ``[0, vocab_size)`` is a MoelabError naming it."""
        V = self.cfg.vocab_size
        if input_ids_BL.device.type == "cpu":  # the CPU lookup checks bounds itself: no extra pass
            try:
                return self.embed(input_ids_BL)
            except IndexError:
                pass
        elif input_ids_BL.numel() == 0 or (int(input_ids_BL.min()) >= 0 and int(input_ids_BL.max()) < V):
            return self.embed(input_ids_BL)
        bad = input_ids_BL[(input_ids_BL < 0) | (input_ids_BL >= V)]
        from moelab.errors import MoelabError

        raise MoelabError(f"input_ids_BL holds token id {int(bad[0])} ({bad.numel()} out of range); expected "
                          f"0 <= id < model.vocab_size={V}")

    def last_aux_loss(self, like: Tensor) -> Tensor:
        """Sum of every MoE layer's ``last_aux`` values of the last forward (detached, reporting only)."""
        total = torch.zeros((), dtype=torch.float32, device=like.device)
        for _, layer in self.moe_layers():
            for value in (getattr(layer, "last_aux", None) or {}).values():
                total = total + value.detach().float()
        return total

    @torch.no_grad()
    def generate(self, input_ids_BL: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None, use_cache: bool = True, sliding_window: bool = False) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``input_ids_BL`` (``[B, L]``; returns ``[B, L + new]``).

        ``temperature == 0`` is greedy; ``top_k`` keeps the k most likely tokens; stops early when
        every row produced ``eos_id``. With ``use_cache`` (default) attention keys/values are cached
        (``moelab.models.generation``: routing stays per token, identical to the full forward);
        ``use_cache=False`` re-runs the whole context for every token (the reference path).
        Prompt + new tokens beyond ``max_seq_len`` raise a MoelabError unless ``sliding_window``
        (then each token past the limit is predicted from the last ``max_seq_len`` tokens).
        """
        from moelab.models import generation as gen

        require_causal(self, "generate")  # refuses routers that read later tokens (moelab.models.causality)
        gen.check_generate_args(input_ids_BL, max_new_tokens, temperature, top_k, eos_id, self.cfg.vocab_size)
        B, L0 = input_ids_BL.shape
        gen.plan_length(L0, max_new_tokens, self.cfg.max_seq_len, sliding_window)
        room = min(self.cfg.max_seq_len, L0 + max_new_tokens - 1)  # the last new token is never fed back
        cache = gen.KVCache.for_model(self, B, room) if use_cache and 0 < max_new_tokens and L0 <= room else None
        sample = partial(gen.sample_next, temperature=temperature, top_k=top_k, generator=generator)
        from moelab.models.depth import route_prefix  # per-sequence depth decisions read the prompt only

        with gen.untracked_moe_layers(self), route_prefix(self, L0):
            return self._decode(input_ids_BL, max_new_tokens, cache, sample, eos_id)

    def _decode(self, ids_BL: Tensor, max_new_tokens: int, cache, sample, eos_id: int | None) -> Tensor:
        """``generate``'s loop: feed, sample, append; a full cache gives way to the sliding window."""
        n_ctx = self.cfg.max_seq_len
        feed_BL = ids_BL[:, -n_ctx:]
        done_B = torch.zeros(ids_BL.shape[0], dtype=torch.bool, device=ids_BL.device)
        for _ in range(max_new_tokens):
            next_B = sample(self(feed_BL, kv_cache=cache).logits[:, -1].float())
            ids_BL = torch.cat([ids_BL, next_B[:, None]], dim=1)
            if cache is not None and cache.length >= cache.capacity:
                cache = None  # the context is full: sliding window from here on (plan_length allowed it)
            feed_BL = next_B[:, None] if cache is not None else ids_BL[:, -n_ctx:]
            if eos_id is not None:
                done_B |= next_B == eos_id
                if bool(done_B.all()):
                    break
        return ids_BL

"""The routing contract: what every router returns and every other part consumes.

Shape legend (suffixes on tensor names, as in torchtitan):
    T tokens (batch and sequence flattened), D model dim, E experts, K fixed top-k,
    S routed slots (one (token, expert) pair each; S = T*K for a fixed k), B batch, L sequence length.

A routing decision is data. Slots are stored flat and sorted by token, i.e. in CSR form:
``token_S`` is non-decreasing and ``offsets_T1[t]:offsets_T1[t+1]`` are token t's slots. This one
form covers a fixed k (S = T*K, viewable as ``[T, K]``), a variable number of experts per token
(top-p, ReLU routing, null experts, expert-choice) and dropped slots (``keep_S``), so every
dispatch backend handles variable k without padding to the maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from moelab.errors import MoelabError


@dataclass
class RoutingContext:
    """What a router may know besides the hidden states.

    ``valid_T`` marks real tokens (False = padding: routed, but never counted by losses, loads,
    bias updates or centroid updates). ``batch_shape`` is (B, L) when tokens come from B
    sequences of length L (sequence-level losses and per-sequence expert-choice need it).
    ``token_ids_T`` is for routers that are functions of the token id (hash routing).
    ``state`` carries cross-layer routing state (recurrent routers, shared decisions) through
    one forward pass of a model; ``layer_index`` is the MoE layer's depth.
    ``prev_token_ids_B`` is the token id just before each sequence's first token when the
    sequences continue earlier ones (KV-cache generation); None when they start here.
    """

    valid_T: Tensor | None = None
    batch_shape: tuple[int, int] | None = None
    token_ids_T: Tensor | None = None
    layer_index: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    prev_token_ids_B: Tensor | None = None


@dataclass
class RoutingResult:
    """One routing decision.

    Attributes:
        token_S, expert_S: long ``[S]`` slot -> token, slot -> expert; sorted by token.
        weight_S: combine weights ``[S]`` (differentiable; never include the selection bias).
        num_tokens, num_experts: T and E.
        logits_TE: fp32 router logits before any selection bias (None for parameter-free routers).
        probs_TE: fp32 router probabilities/scores that balance losses use.
        k: the fixed number of experts per token before drops, or None when it varies.
        keep_S: bool ``[S]``, False where capacity dropped the slot (None: nothing dropped).
        selection_bias_E: the bias that changed which experts were chosen (aux-loss-free
            balancing); kept apart from the weights.
        valid_T: bool ``[T]``, False for padding tokens.
        aux_losses: regularisers the router itself owns (top-p entropy, ReLU L1, ...), already
            multiplied by their coefficients; the MoE layer adds them to the objective.
        causal: False when a token's decision depends on other tokens of its sequence at later
            positions (expert-choice): such routers leak the future in autoregressive use.
        loss_form: how balance and pool losses read ``probs_TE``: ``"normalized"`` (each token's
            scores renormalised to sum 1, ``f = counts / sum(counts)``: 1.0 at balance) or
            ``"unipool"`` (UniPool's / Megatron's form for NormRouter: the raw scores and
            ``f = counts / (k T)``; see ``moelab.layers.balancing``).
    """

    token_S: Tensor
    expert_S: Tensor
    weight_S: Tensor
    num_tokens: int
    num_experts: int
    logits_TE: Tensor | None = None
    probs_TE: Tensor | None = None
    k: int | None = None
    keep_S: Tensor | None = None
    selection_bias_E: Tensor | None = None
    valid_T: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    causal: bool = True
    loss_form: str = "normalized"

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_topk(cls, indices_TK: Tensor, weights_TK: Tensor, num_experts: int, **kw: Any) -> "RoutingResult":
        """Build from a fixed-k choice: ``indices_TK`` long, ``weights_TK`` combine weights."""
        T, K = indices_TK.shape
        token_S = torch.arange(T, device=indices_TK.device).repeat_interleave(K)
        return cls(
            token_S=token_S,
            expert_S=indices_TK.reshape(-1).long(),
            weight_S=weights_TK.reshape(-1),
            num_tokens=T,
            num_experts=num_experts,
            k=K,
            **kw,
        )

    @classmethod
    def from_mask(cls, mask_TE: Tensor, weights_TE: Tensor, **kw: Any) -> "RoutingResult":
        """Build from a boolean choice mask ``[T, E]`` (any number of experts per token)."""
        T, E = mask_TE.shape
        token_S, expert_S = mask_TE.nonzero(as_tuple=True)  # row-major: sorted by token
        return cls(
            token_S=token_S,
            expert_S=expert_S,
            weight_S=weights_TE[token_S, expert_S],
            num_tokens=T,
            num_experts=E,
            **kw,
        )

    # ----------------------------------------------------------------- views
    @property
    def num_slots(self) -> int:
        return int(self.token_S.numel())

    @property
    def offsets_T1(self) -> Tensor:
        """CSR offsets ``[T+1]``: token t owns slots ``offsets[t]:offsets[t+1]``."""
        counts = torch.bincount(self.token_S, minlength=self.num_tokens)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def _counted_S(self) -> Tensor:
        """Slots that count for loads: kept and from a real (non-padding) token."""
        m = torch.ones_like(self.token_S, dtype=torch.bool)
        if self.keep_S is not None:
            m = m & self.keep_S
        if self.valid_T is not None:
            m = m & self.valid_T[self.token_S]
        return m

    def counts_E(self) -> Tensor:
        """Kept slots per expert from real tokens (long ``[E]``)."""
        return torch.bincount(self.expert_S[self._counted_S()], minlength=self.num_experts)

    def routed_counts_E(self) -> Tensor:
        """Slots per expert before capacity drops (real tokens only)."""
        m = torch.ones_like(self.token_S, dtype=torch.bool)
        if self.valid_T is not None:
            m = self.valid_T[self.token_S]
        return torch.bincount(self.expert_S[m], minlength=self.num_experts)

    def experts_per_token_T(self) -> Tensor:
        """Kept experts per token (long ``[T]``); padding tokens included (mask with valid_T)."""
        keep = self.keep_S if self.keep_S is not None else torch.ones_like(self.token_S, dtype=torch.bool)
        return torch.bincount(self.token_S[keep], minlength=self.num_tokens)

    def dropped_fraction(self) -> float:
        if self.keep_S is None:
            return 0.0
        real = torch.ones_like(self.keep_S) if self.valid_T is None else self.valid_T[self.token_S]
        n = int(real.sum())
        return 0.0 if n == 0 else float((~self.keep_S & real).sum()) / n

    def dense_TE(self) -> Tensor:
        """Combine weights as a dense ``[T, E]`` matrix (zero where not routed or dropped)."""
        w = self.weight_S if self.keep_S is None else self.weight_S * self.keep_S.to(self.weight_S.dtype)
        out = w.new_zeros(self.num_tokens, self.num_experts)
        return out.index_put((self.token_S, self.expert_S), w, accumulate=True)

    def topk_view(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(indices_TK, weights_TK, keep_TK)`` for a fixed-k result."""
        if self.k is None or self.num_slots != self.num_tokens * self.k:
            raise MoelabError("topk_view needs a fixed-k routing (k is None or slots != T*k)")
        keep = self.keep_S if self.keep_S is not None else torch.ones_like(self.token_S, dtype=torch.bool)
        K = self.k
        return (
            self.expert_S.view(self.num_tokens, K),
            self.weight_S.view(self.num_tokens, K),
            keep.view(self.num_tokens, K),
        )

    def kept(self) -> "RoutingResult":
        """The same routing with dropped slots removed (what dispatch computes)."""
        if self.keep_S is None:
            return self
        m = self.keep_S
        return replace(
            self, token_S=self.token_S[m], expert_S=self.expert_S[m], weight_S=self.weight_S[m],
            keep_S=None, k=None if not bool(m.all()) else self.k,
        )

    def with_keep(self, keep_S: Tensor) -> "RoutingResult":
        return replace(self, keep_S=keep_S)

    # ----------------------------------------------------------------- checks
    def validate(self) -> "RoutingResult":
        """Check the contract's invariants; raise MoelabError naming the broken one."""
        S = self.num_slots
        for name in ("expert_S", "weight_S"):
            if getattr(self, name).shape != (S,):
                raise MoelabError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({S},)")
        if S:
            if int(self.expert_S.min()) < 0 or int(self.expert_S.max()) >= self.num_experts:
                raise MoelabError(f"expert_S out of range [0, {self.num_experts})")
            if int(self.token_S.min()) < 0 or int(self.token_S.max()) >= self.num_tokens:
                raise MoelabError(f"token_S out of range [0, {self.num_tokens})")
            if bool((self.token_S[1:] < self.token_S[:-1]).any()):
                raise MoelabError("token_S must be sorted (CSR order)")
            pair = self.token_S * self.num_experts + self.expert_S
            if pair.unique().numel() != S:
                raise MoelabError("a token is routed to the same expert twice")
            w = self.weight_S.detach()
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise MoelabError("weight_S must be finite and non-negative")
        if self.keep_S is not None and self.keep_S.shape != (S,):
            raise MoelabError(f"keep_S has shape {tuple(self.keep_S.shape)}, expected ({S},)")
        return self

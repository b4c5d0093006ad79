"""Expert layouts across depth as modules: shared pools (UniPool), cross-layer reuse (ReXMoE),
shared routers (Omni-Router) and the pool-level balance loss.

Shape legend: T tokens, D model dim, F expert hidden dim, E a layer's local experts (its router's
size), N experts of one bank, S routed slots.

**One mechanism for every layout: a window onto banks.** A layout (``moelab.layers.layouts``,
``plan_layout``) stores routed experts in a few :class:`~moelab.layers.experts.ExpertBank` s and
gives each MoE layer a :class:`PooledExperts` window: an ordered list of ``(bank, start, stop)``
ranges. The layer's router works in local indices ``0..E-1``; local expert i is the i-th expert
of the concatenated ranges, and ``experts.expert_map`` (long ``[E]``) names it globally (bank
offset + index; analysis maps ``routing.expert_S`` through it). The window exposes the stacked
weights ``w_gate_EFD``/``w_up_EFD``/``w_down_EDF`` like a bank does: a single range is a
``narrow`` (a view: no copy), several are concatenated. Every dispatch backend and every seam
router (SMEAR, ERC, ...) therefore works unchanged, and gradients from every layer accumulate in
the one bank parameter by autograd. Expressed this way:

* full sharing (UniPool): one range ``(pool, 0, P)`` for every layer;
* slices (vanilla MoE inside one bank of L*E experts): ``(0, l*E, (l+1)*E)``;
* ReXMoE: ``(0, (l-r)*E, (l+r+1)*E)``, the experts of layers l-r..l+r;
* pool + private experts: ``(pool, 0, P)`` then ``(private_l, 0, E_p)``;
* several pools: layer groups with different pool banks.

(Choice: the map lives on the layer's ``experts`` window, not as a new MoELayer argument, so
MoELayer, the dispatch backends and the routers need no change; ``MoELayer(cfg, experts=window)``
checks ``window.num_experts == cfg.num_experts`` like any bank.) Banks are owned once, by an
:class:`ExpertLayout` module (the model's ``expert_layout``); windows hold unregistered references,
so ``state_dict`` holds each pool once (safetensors refuses tensors shared between keys) and
``model.parameters()`` yields it once.

**Pool-level balance loss** (UniPool, Huang et al. 2026, arXiv:2605.06665): the Switch loss of
the pool as a whole, from utilisation aggregated over every layer that draws from it,
``N * sum_j f_j * pbar_j`` with ``f_j`` the fraction of the pool's routed slots that went to
expert j and ``pbar_j`` the mean (over layers and real tokens) of the router's distribution
restricted to the pool and renormalised. 1.0 at perfect pool balance; a pool whose experts are
starved across layers scores > 1 even when each layer looks balanced over the experts it uses.
(``layouts.pool_balance_loss`` is the same number for a fixed k; here ``f`` is normalised by the
slots actually routed so that variable-k routers such as NormRouter also give 1.0 at balance.)
:class:`PoolBalance` implements two modes (``layout.pool_loss_mode``):

* ``lagged_micro`` (default): what UniPool's code does (``PoolAuxLossAccumulator`` in its
  Megatron-LM ``moe_utils.py``): as ``lagged`` below, but ``f_prev`` is the pool's slot counts of
  the *previous training micro-batch* (all member layers of the last completed forward), rolled
  over when the pool's deepest layer has run. Under gradient accumulation the second micro-batch
  of a step therefore uses the first's counts (and the first uses the last one of the previous
  step). The counts are checkpointed (``mb_prev_count_N``; checkpoints written before this mode
  existed load with zeros, i.e. a term of 0 on the first micro-batch after resume).
* ``lagged``: the pool loss "one optimizer step behind", to avoid cross-layer
  tensor dependencies. Layer l's term is ``coef * N * sum_j f_prev_j * p_lj / n_layers`` with
  ``f_prev`` the pool's slot fractions of the *previous optimizer step* (all layers, all
  micro-batches; a buffer, no gradient) and ``p_lj`` this layer's mean renormalised probability
  of pool expert j. Summed over the pool's layers it is the pool loss with last step's ``f``, and
  its gradient (which flows through ``P`` only, as in every Switch loss) reaches each router
  locally through the layer's own ``AttachAuxLoss``: no tensor crosses layers, so it works with
  activation checkpointing and pipeline stages. The counts roll over in ``step_update``, which
  ``balancing.install_aux_free_hook`` calls once per optimizer step (``PoolBalance`` is a
  ``StepAccumulator``, so the existing hook covers it without change). On the first step (no
  previous counts) the term is 0.
* ``exact``: same-step ``f``. Each layer leaves its (differentiable) probability sums and counts
  in ``ctx.state["layout.pool<b>"]``; the pool's deepest layer, which runs last, computes the
  loss over all of them and attaches it to its own output. Exact within a micro-batch, but it
  keeps every layer's router graph alive until the last layer and needs the model's shared
  ``RoutingContext`` (a layer called alone sees only itself).

**Loss form.** For routings with ``loss_form == "unipool"`` (NormRouter's default) the pool
term is UniPool's exactly: the router's raw scores (not renormalised, restricted to the pool's
columns) and ``f_j = counts_j / (k * T)`` (Megatron's ``switch_load_balancing_loss_func``
normalisation), so the loss is not 1.0 at balance and NormRouter's learnable ``norm_scale`` gets
its gradient. Other routings use the normalised form above (1.0 at balance).

The lagged modes are the default because they are what UniPool does and they are local (no cross-layer graph,
no dependence on call order); the difference is one step of staleness in ``f``, which moves
slowly.

**Shared routers.** ``router_sharing="omni"``: Omni-Router (Gu, Likhomanenko & Jaitly 2025,
"Omni-Router: Sharing Routing Decisions in Sparse Mixture-of-Experts for Speech Recognition",
arXiv:2507.05724): one router (weights, aux-free bias, accumulators) shared by all MoE layers, each
layer applying it to its own hidden state (:class:`SharedRouter`). ``"decision"``: the first MoE
layer's routing decision is reused as is by every later MoE layer
(``ctx.state["layout.shared_decision"]``; :class:`PublishDecision` / :class:`ReusedDecision`); the
reusing layers add no balance loss of their own (the decision's loss is counted once). Both need
routers without a ``forward_layer`` seam.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice
from moelab.layers.balancing import StepAccumulator, normalize_probs
from moelab.layers.config import MoEConfig
from moelab.layers.experts import ExpertBank
from moelab.layers.layouts import POOL_LOSS_MODES, LayoutConfig, LayoutPlan, layout_param_counts, plan_layout
from moelab.layers.moe import MoELayer
from moelab.layers.routing import RoutingContext, RoutingResult

DECISION_KEY = "layout.shared_decision"


# --------------------------------------------------------------------------- the window
class PooledExperts(nn.Module):
    """A layer's window onto one or more banks: ``segments`` = ``[(bank, start, stop), ...]``.

    Duck-types :class:`ExpertBank` (``w_gate_EFD``, ``w_up_EFD``, ``w_down_EDF``, ``num_experts``,
    ``d_model``, ``d_ff``, ``activation``, ``gated``). The banks are referenced, not registered:
    their owner (``ExpertLayout``) registers them once. ``expert_map`` (long ``[E]``, a
    non-persistent buffer) holds the global ids ``bank_offsets[bank] + index``.
    """

    def __init__(self, banks: list[ExpertBank], segments: list[tuple[int, int, int]],
                 bank_offsets: list[int] | None = None) -> None:
        super().__init__()
        if not segments:
            raise MoelabError("PooledExperts needs at least one (bank, start, stop) segment")
        for b, s, e in segments:
            if not 0 <= b < len(banks) or not 0 <= s < e <= banks[b].num_experts:
                raise MoelabError(f"segment (bank={b}, start={s}, stop={e}) is out of range of the banks")
        ref = banks[segments[0][0]]
        for b, _, _ in segments:
            if (banks[b].d_model, banks[b].d_ff, banks[b].activation) != (ref.d_model, ref.d_ff, ref.activation):
                raise MoelabError("PooledExperts segments must come from banks of equal d_model, d_ff and activation")
        object.__setattr__(self, "_banks", list(banks))  # unregistered references
        self.segments = [tuple(int(v) for v in seg) for seg in segments]
        offsets = bank_offsets if bank_offsets is not None else [0] * len(banks)
        ids = [offsets[b] + i for b, s, e in self.segments for i in range(s, e)]
        self.register_buffer("expert_map", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.num_experts = len(ids)
        self.d_model, self.d_ff, self.activation = ref.d_model, ref.d_ff, ref.activation
        self.gated = ref.gated

    @property
    def banks(self) -> list[ExpertBank]:
        return self._banks  # type: ignore[attr-defined]

    def _window(self, name: str) -> Tensor | None:
        parts = []
        for b, s, e in self.segments:
            w = getattr(self.banks[b], name)
            if w is None:
                return None
            parts.append(w if (s == 0 and e == w.shape[0]) else w.narrow(0, s, e - s))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    @property
    def w_gate_EFD(self) -> Tensor | None:
        return self._window("w_gate_EFD")

    @property
    def w_up_EFD(self) -> Tensor:
        return self._window("w_up_EFD")  # type: ignore[return-value]

    @property
    def w_down_EDF(self) -> Tensor:
        return self._window("w_down_EDF")  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, segments={self.segments}"


# --------------------------------------------------------------------------- pool-level balance
class PoolBalance(StepAccumulator):
    """UniPool's pool-level balance loss over one bank of ``num_experts`` (N) experts.

    ``members``: block indices of the layers drawing from the bank (the deepest one runs last).
    Buffers (float64): ``count_N``/``tokens`` accumulate routed slots / (layer, real token) pairs
    of the current optimizer step (training mode with grad only); ``prev_count_N``/``prev_tokens``
    hold the previous step's (persistent: checkpointed, so a resumed run continues exactly).
    ``last_count_N`` holds the pool counts of the most recent forward of all members (any mode),
    for reporting (:meth:`stats`).
    """

    def __init__(self, num_experts: int, members: list[int], *, coef: float = 0.01, mode: str = "lagged",
                 bank: int = 0) -> None:
        super().__init__()
        check_choice("pool_loss_mode", mode, POOL_LOSS_MODES)
        self.num_experts = int(num_experts)
        self.members = sorted(int(m) for m in members)
        self.coef = float(coef)
        self.mode = mode
        self.bank = int(bank)
        N = self.num_experts
        self.register_buffer("count_N", torch.zeros(N, dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("prev_count_N", torch.zeros(N, dtype=torch.float64))
        self.register_buffer("prev_tokens", torch.zeros((), dtype=torch.float64))
        self.register_buffer("last_count_N", torch.zeros(N, dtype=torch.float64), persistent=False)
        self.register_buffer("mb_count_N", torch.zeros(N, dtype=torch.float64), persistent=False)
        self.register_buffer("mb_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("mb_prev_count_N", torch.zeros(N, dtype=torch.float64))
        self.register_buffer("mb_prev_tokens", torch.zeros((), dtype=torch.float64))
        self.num_updates = 0

    _MB_KEYS = ("mb_prev_count_N", "mb_prev_tokens")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Checkpoints from before the micro-batch lag have no mb_prev_* buffers: keep zeros.
        for key in self._MB_KEYS:
            if prefix + key not in state_dict:
                state_dict[prefix + key] = getattr(self, key).detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def state_key(self) -> str:
        return f"layout.pool{self.bank}"

    # -- per-layer pieces
    def layer_usage(self, routing: RoutingResult, cols_C: Tensor, idx_C: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(p_sum_N, counts_N, n_tokens)`` of one layer over this pool.

        ``cols_C``: the layer's local expert indices that lie in this bank; ``idx_C``: their bank
        indices. ``p_sum_N``: the layer's router distribution restricted to those columns,
        renormalised per token (raw scores for ``routing.loss_form == "unipool"``), summed over real tokens and scattered into bank order
        (differentiable). ``counts_N``: routed slots (before drops, real tokens) per bank expert.
        """
        N = self.num_experts
        if routing.probs_TE is None:  # parameter-free routers: counts only (the loss needs probabilities)
            if self.coef != 0.0:
                raise MoelabError("the pool-level balance loss needs router probabilities (routing.probs_TE is "
                                  "None); set layout.pool_loss_coef=0 with this router")
            probs_TE = torch.zeros(routing.num_tokens, routing.num_experts, device=idx_C.device)
        else:
            probs_TE = routing.probs_TE
        p_TC = probs_TE[:, cols_C].float()
        if routing.loss_form != "unipool":
            p_TC = normalize_probs(p_TC)
        valid_T = routing.valid_T
        if valid_T is not None:
            p_TC = p_TC * valid_T[:, None].to(p_TC.dtype)
            n_tokens = int(valid_T.sum())
        else:
            n_tokens = routing.num_tokens
        p_sum_N = p_TC.new_zeros(N).index_add(0, idx_C, p_TC.sum(0))
        local_to_bank_E = torch.full((routing.num_experts,), -1, dtype=torch.long, device=idx_C.device)
        local_to_bank_E[cols_C] = idx_C
        counts_E = routing.routed_counts_E()
        in_pool = local_to_bank_E >= 0
        counts_N = torch.zeros(N, dtype=torch.float64, device=idx_C.device).index_add(
            0, local_to_bank_E[in_pool], counts_E[in_pool].to(torch.float64))
        return p_sum_N, counts_N, n_tokens

    def layer_term(self, layer_index: int, usage: tuple[Tensor, Tensor, int],
                   ctx: RoutingContext | None, *, k: int = 1, form: str = "normalized") -> Tensor | None:
        """This layer's share of the pool loss (already times ``coef``) from its
        :meth:`layer_usage`, or None (exact mode, not the pool's last layer). Also accumulates
        the step's and the micro-batch's counts (training only) and the last forward's counts.

        ``k``/``form``: the layer's top-k and the routing's ``loss_form`` (``"unipool"``:
        ``f = counts / (k * tokens)``; else ``f = counts / sum(counts)``)."""
        p_sum_N, counts_N, n_tokens = usage
        accumulate = self.accumulating()  # read outside no_grad: it checks the grad mode
        self._count(layer_index, counts_N, n_tokens, accumulate)
        N = self.num_experts
        if self.mode != "exact":
            micro = self.mode == "lagged_micro"
            prev_N = self.mb_prev_count_N if micro else self.prev_count_N
            prev_n = self.mb_prev_tokens if micro else self.prev_tokens
            f_N = pool_fractions(prev_N, prev_n, k, form).to(p_sum_N)
            term = self.coef * N * (f_N * p_sum_N).sum() / max(n_tokens, 1) / len(self.members)
            if micro and accumulate and layer_index == self.members[-1]:
                self._roll_micro_batch()
            return term
        # exact: gather every member's usage of this forward; the last member computes the loss
        entries = [(p_sum_N, counts_N, n_tokens)]
        if ctx is not None:
            entries = ctx.state.setdefault(self.state_key, [])
            entries.append((p_sum_N, counts_N, n_tokens))
            if layer_index != self.members[-1]:
                return None
        return self.coef * exact_pool_loss(entries, N, k=k, form=form)

    @torch.no_grad()
    def _count(self, layer_index: int, counts_N: Tensor, n_tokens: int, accumulate: bool) -> None:
        if layer_index == self.members[0]:
            self.last_count_N.zero_()
        self.last_count_N += counts_N.to(self.last_count_N)
        if accumulate:
            self.count_N += counts_N.to(self.count_N)
            self.tokens += n_tokens
            self.mb_count_N += counts_N.to(self.mb_count_N)
            self.mb_tokens += n_tokens

    @torch.no_grad()
    def _roll_micro_batch(self) -> None:
        self.mb_prev_count_N.copy_(self.mb_count_N)
        self.mb_prev_tokens.copy_(self.mb_tokens)
        self.mb_count_N.zero_()
        self.mb_tokens.zero_()

    # -- per optimizer step
    @torch.no_grad()
    def step_update(self) -> None:
        if float(self.tokens) > 0:
            self.prev_count_N.copy_(self.count_N)
            self.prev_tokens.copy_(self.tokens)
            self.num_updates += 1
        self.count_N.zero_()
        self.tokens.zero_()

    def value(self, which: str = "prev") -> float:
        """The pool loss's value without coefficient, from the counts of the previous step
        (``"prev"``) or the last forward (``"last"``), with ``f`` standing in for ``p``."""
        c = self.prev_count_N if which == "prev" else self.last_count_N
        if float(c.sum()) == 0:
            return float("nan")
        f = c / c.sum()
        return float(self.num_experts * (f * f).sum())

    def stats(self, which: str = "last") -> dict[str, Any]:
        """Pool utilisation: counts, max/mean, CV, unused experts (of the last forward or step)."""
        c = (self.last_count_N if which == "last" else self.prev_count_N).double()
        mean = float(c.mean())
        return {"pool": self.bank, "counts": [int(v) for v in c.tolist()],
                "load_max_over_mean": float(c.max()) / mean if mean > 0 else float("nan"),
                "load_cv": float(c.std(unbiased=False)) / mean if mean > 0 else float("nan"),
                "unused_experts": int((c == 0).sum())}

    def extra_repr(self) -> str:
        return f"N={self.num_experts}, members={self.members}, coef={self.coef}, mode={self.mode!r}"


def pool_fractions(counts_N: Tensor, tokens: Tensor | float, k: int, form: str = "normalized") -> Tensor:
    """``f_j``: ``counts_j / sum(counts)`` (normalised form) or UniPool's ``counts_j / (k * tokens)``
    (``form="unipool"``; ``tokens`` = (layer, real token) pairs the counts come from). 0 when empty."""
    if form == "unipool":
        t = torch.as_tensor(tokens, dtype=counts_N.dtype, device=counts_N.device)
        return counts_N / (k * t).clamp_min(1.0)
    return counts_N / counts_N.sum().clamp_min(1.0)


def exact_pool_loss(entries: list[tuple[Tensor, Tensor, int]], num_experts: int, *, k: int = 1,
                    form: str = "normalized") -> Tensor:
    """``N * sum_j f_j * pbar_j`` from every layer's ``(p_sum_N, counts_N, n_tokens)`` (1.0 at
    balance in the normalised form; ``f`` from :func:`pool_fractions`)."""
    p_sum_N = sum(e[0] for e in entries)
    counts_N = sum(e[1] for e in entries)
    n = sum(e[2] for e in entries)
    f_N = pool_fractions(counts_N, float(n), k, form).to(p_sum_N)
    return num_experts * (f_N * p_sum_N).sum() / max(n, 1)


# --------------------------------------------------------------------------- the layer
class PoolMoELayer(MoELayer):
    """An :class:`MoELayer` whose experts are a :class:`PooledExperts` window and which adds the
    pool-level balance term of every shared bank it draws from (``last_aux["pool_loss"]``).

    ``last_stats`` gains ``pool_counts`` (this layer's routed slots per expert of its first
    shared pool, in bank order) and ``pool`` (that bank's index).
    """

    def __init__(self, cfg: MoEConfig, experts: PooledExperts, *, layer_index: int = 0,
                 balances: list[PoolBalance] | None = None) -> None:
        super().__init__(cfg, experts=experts)
        self.layer_index = int(layer_index)
        local = [(b, i) for b, s, e in experts.segments for i in range(s, e)]  # (bank, index) per local expert
        links = []
        for j, bal in enumerate(balances or []):
            cols = [c for c, (b, _) in enumerate(local) if b == bal.bank]
            idx = [i for b, i in local if b == bal.bank]
            if not cols:
                raise MoelabError(f"layer {layer_index} does not draw from pool bank {bal.bank}")
            self.register_buffer(f"pool_cols{j}", torch.tensor(cols, dtype=torch.long), persistent=False)
            self.register_buffer(f"pool_idx{j}", torch.tensor(idx, dtype=torch.long), persistent=False)
            links.append(bal)
        object.__setattr__(self, "_pool_links", links)  # PoolBalance modules are owned by the layout
        self._last_pool_counts: Tensor | None = None

    @property
    def pool_balances(self) -> list[PoolBalance]:
        return list(self._pool_links)  # type: ignore[attr-defined]

    def balance(self, routing: RoutingResult, ctx: RoutingContext | None) -> dict[str, Tensor]:
        losses = super().balance(routing, ctx)
        for j, bal in enumerate(self.pool_balances):
            usage = bal.layer_usage(routing, getattr(self, f"pool_cols{j}"), getattr(self, f"pool_idx{j}"))
            if j == 0:
                self._last_pool_counts = usage[1].detach()
            term = bal.layer_term(self.layer_index, usage, ctx, k=self.cfg.k, form=routing.loss_form)
            if term is not None and bal.coef != 0.0:
                losses["pool_loss"] = losses["pool_loss"] + term if "pool_loss" in losses else term
        return losses

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        y = super().forward(x, ctx)
        if self.pool_balances and self._last_pool_counts is not None:
            self.last_stats["pool"] = self.pool_balances[0].bank
            self.last_stats["pool_counts"] = [int(v) for v in self._last_pool_counts.tolist()]
        return y


# --------------------------------------------------------------------------- shared routers
def _router_is_causal(router: nn.Module, training: bool | None) -> bool:
    fn = getattr(router, "is_causal", None)
    return bool(fn(training)) if callable(fn) else bool(getattr(router, "causal", True))


def _check_shareable(router: nn.Module, how: str) -> None:
    if hasattr(router, "forward_layer"):
        raise MoelabError(f"layout.router_sharing={how!r} is not supported with router "
                          f"{type(router).__name__} (it computes the layer output itself through forward_layer)")


class SharedRouter(nn.Module):
    """Omni-Router: calls the owner router (registered in the first MoE layer only) on this
    layer's hidden state; balance losses come from the owner (its accumulators see every layer)."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        _check_shareable(owner, "omni")
        object.__setattr__(self, "_owner", owner)
        self.causal = getattr(owner, "causal", True)

    @property
    def owner(self) -> nn.Module:
        return self._owner  # type: ignore[attr-defined]

    def is_causal(self, training: bool | None = None) -> bool:
        return _router_is_causal(self.owner, self.training if training is None else training)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        return self.owner(x_TD, ctx)

    def balance_losses(self, routing: RoutingResult, ctx: RoutingContext | None = None) -> dict[str, Tensor]:
        return self.owner.balance_losses(routing, ctx)


class PublishDecision(nn.Module):
    """Wraps the first MoE layer's router and leaves its decision in ``ctx.state`` for reuse."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        _check_shareable(inner, "decision")
        self.inner = inner
        self.causal = getattr(inner, "causal", True)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        routing = self.inner(x_TD, ctx)
        if ctx is not None:
            ctx.state[DECISION_KEY] = routing
        return routing

    def is_causal(self, training: bool | None = None) -> bool:
        return _router_is_causal(self.inner, training)

    def balance_losses(self, routing: RoutingResult, ctx: RoutingContext | None = None) -> dict[str, Tensor]:
        return self.inner.balance_losses(routing, ctx)


class ReusedDecision(nn.Module):
    """Returns the decision the first MoE layer published in ``ctx.state`` (no parameters, no loss).

    The returned routing carries no ``aux_losses``: the router-owned losses (ReLU L1, top-p
    entropy, null-expert, noisy-top-k, StableMoE, ...) belong to the first layer's decision and
    are counted once, by the first layer (issue 13: they used to be added once per layer).
    """

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        routing = None if ctx is None else ctx.state.get(DECISION_KEY)
        if routing is None:
            raise MoelabError(f"layout.router_sharing='decision': no decision in ctx.state[{DECISION_KEY!r}]; "
                              "the first MoE layer must run first with the same RoutingContext")
        if routing.num_tokens != x_TD.shape[0]:
            raise MoelabError(f"shared decision has T={routing.num_tokens}, this layer got T={x_TD.shape[0]}")
        return replace(routing, aux_losses={})

    def is_causal(self, training: bool | None = None) -> bool:
        """The reused decision is the first layer's; its router's flag is checked there."""
        return True

    def balance_losses(self, routing: RoutingResult, ctx: RoutingContext | None = None) -> dict[str, Tensor]:
        return {}


# --------------------------------------------------------------------------- building a layout
class ExpertLayout(nn.Module):
    """Owner of a layout's banks (``banks``) and pool-balance modules (``balances``).

    ``plan``: the resolved :class:`LayoutPlan`; ``pool_stats()``: utilisation of every pool.
    """

    def __init__(self, plan: LayoutPlan, banks: list[ExpertBank], balances: list[PoolBalance]) -> None:
        super().__init__()
        self.plan = plan
        self.banks = nn.ModuleList(banks)
        self.balances = nn.ModuleList(balances)

    def pool_stats(self, which: str = "last") -> list[dict[str, Any]]:
        return [bal.stats(which) for bal in self.balances]

    def extra_repr(self) -> str:
        return f"kind={self.plan.kind!r}, banks={list(self.plan.banks)}"


def build_layout(layout: LayoutConfig, moe: MoEConfig, moe_layers: list[int]
                 ) -> tuple[ExpertLayout | None, dict[int, MoELayer]]:
    """Build the MoE layers of blocks ``moe_layers`` following ``layout``.

    Returns ``(owner, {block index: layer})``; ``owner`` is None for plain per-layer layouts (the
    layers own their experts: state_dict keys are those of vanilla MoE). Register ``owner`` once in
    the model (``model.expert_layout``).
    """
    plan = plan_layout(layout, moe.num_experts, moe.k, list(moe_layers))
    layers: dict[int, MoELayer] = {}
    owner = None
    if plan.kind == "per_layer":
        for lp in plan.layers:
            layers[lp.layer] = MoELayer(replace(moe, num_experts=lp.num_experts, k=lp.k))
    else:
        banks = [ExpertBank(replace(moe, num_experts=n)) for n in plan.banks]
        balances = [PoolBalance(n, plan.layers_of_bank(b), coef=layout.pool_loss_coef, mode=layout.pool_loss_mode,
                                bank=b) for b, n in enumerate(plan.banks) if plan.pooled[b]]
        offsets = plan.bank_offsets
        for lp in plan.layers:
            window = PooledExperts(banks, list(lp.segments), offsets)
            used = {b for b, _, _ in lp.segments}
            mine = [bal for bal in balances if bal.bank in used]
            layers[lp.layer] = PoolMoELayer(replace(moe, num_experts=lp.num_experts, k=lp.k), window,
                                            layer_index=lp.layer, balances=mine)
        owner = ExpertLayout(plan, banks, balances)
    if layout.router_sharing != "none" and plan.layers:
        first = layers[plan.layers[0].layer]
        if layout.router_sharing == "omni":
            _check_shareable(first.router, "omni")
            for lp in plan.layers[1:]:
                layers[lp.layer].router = SharedRouter(first.router)
        else:
            first.router = PublishDecision(first.router)
            for lp in plan.layers[1:]:
                layers[lp.layer].router = ReusedDecision()
    return owner, layers


def layout_report(layout: LayoutConfig, moe: MoEConfig, moe_layers: list[int], d_model: int) -> dict[str, Any]:
    """Expert parameters of ``layout`` vs the matched vanilla model (closed form; for ``moelab info``)."""
    plan = plan_layout(layout, moe.num_experts, moe.k, list(moe_layers))
    out = layout_param_counts(plan, d_model, moe.d_ff, moe.activation)
    out["kind"] = plan.kind
    return out


def routed_param_counts(moe_layers: list[nn.Module]) -> dict[str, int]:
    """Measured routed-expert parameters of a model's MoE layers: ``total`` (each distinct
    parameter once, shared pools included once) and ``active`` (per token: k_l of E_l experts of
    each layer; an expert used by two layers counts twice, like its FLOPs)."""
    seen: set[int] = set()
    total = active = 0
    for layer in moe_layers:
        experts = getattr(layer, "experts", None)
        if experts is None:
            continue
        banks = experts.banks if isinstance(experts, PooledExperts) else [experts]
        for bank in banks:
            for p in bank.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        n_bank = getattr(banks[0], "num_experts", None) or layer.cfg.num_experts
        per_expert = sum(p.numel() for p in banks[0].parameters()) // n_bank
        active += per_expert * layer.cfg.k
    return {"total": total, "active": active}

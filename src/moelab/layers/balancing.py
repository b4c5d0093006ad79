"""Load balancing: balance losses as pure functions, and auxiliary-loss-free bias balancing.

Shape legend: T tokens, E experts, B sequences, L sequence length, S routed slots.

**One normalisation.** Every balance loss here equals **1.0 at perfect balance** (Megatron-LM's
convention). Hugging Face's ``load_balancing_loss_func`` equals ``k`` at balance, so its
``router_aux_loss_coef`` acts ``k`` times stronger than the same number here; use
:func:`hf_to_moelab_coef` / :func:`moelab_to_hf_coef` / :func:`megatron_to_moelab_coef`.

**The load-balancing loss** (Switch, Fedus et al. 2021, eq. 4; GShard, Lepikhin et al. 2020)::

    L = E * sum_i f_i * P_i,   f_i = c_i / sum_j c_j,   P_i = mean over real tokens of p_ti

``c_i`` are the slots routed to expert i (before capacity drops, real tokens only) and ``p_t`` is
the token's router distribution normalised to sum 1 (a no-op for softmax routers; for sigmoid
routers it is DeepSeek-V3's ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}``). For a fixed k, ``sum_j c_j =
k*T`` and ``L = E/(k*T) * sum_i c_i * P_i`` exactly as in Megatron's ``switch_load_balancing_loss_func``;
dividing by the routed slots instead of ``k*T`` keeps ``L = 1`` at balance for variable-k routers
too. At perfect balance (f_i = P_i = 1/E) ``L = 1``. Gradients flow through ``P`` only.

Scopes (``MoEConfig.aux_loss``):
    ``switch``   f and P over the micro-batch (this layer's tokens).
    ``sequence`` DeepSeek-V3's complementary sequence-wise loss (DeepSeek-AI 2024, section 2.1.2): the
                 same per sequence, averaged over sequences (needs ``ctx.batch_shape``).
    ``global``   global-batch balance (Qiu et al. 2025, "Demons in the detail", arXiv 2501.11873;
                 Megatron's ``global_aux_loss``): f from counts accumulated over all micro-batches of
                 one optimizer step (see :class:`GlobalLoadAccumulator`).

Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean over real tokens of logsumexp(logits_t)^2``.

Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3): a per-expert bias
added to the scores only when choosing experts, nudged once per optimizer step by
``b_i += gamma * sign(mean_load - load_i)`` and re-centred to zero mean (torchtitan's re-centring keeps
the bias from drifting). See :class:`AuxFreeBias` and :func:`install_aux_free_hook`.

Padding (``valid_T`` False) is never counted: not in counts, not in P, not in the z-loss, not in
the bias load, not in the global accumulator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice

if TYPE_CHECKING:  # pragma: no cover
    from moelab.layers.config import MoEConfig
    from moelab.layers.routing import RoutingContext, RoutingResult

AUX_LOSSES = ("none", "switch", "sequence", "global")
_EPS = 1e-20  # normaliser guard for sigmoid scores (Megatron's value)


# --------------------------------------------------------------------------- pure functions
def normalize_probs(probs_TE: Tensor) -> Tensor:
    """Row-normalise router scores to a distribution (identity for softmax probabilities)."""
    probs_TE = probs_TE.float()
    return probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(_EPS)


def _mean_over_valid(x_TE: Tensor, valid_T: Tensor | None) -> Tensor:
    if valid_T is None:  # 0 tokens give 0, not NaN (0/0)
        return x_TE.sum(0) / max(x_TE.shape[0], 1)
    w_T = valid_T.to(x_TE.dtype)
    return (x_TE * w_T[:, None]).sum(0) / w_T.sum().clamp_min(1.0)


def switch_aux_loss(probs_TE: Tensor, counts_E: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i`` (1.0 at perfect balance).

    Args:
        probs_TE: router probabilities/scores (differentiable); normalised to sum 1 per token here.
        counts_E: slots routed to each expert, real tokens only, before drops (no gradient).
            Pass counts accumulated over several micro-batches for the global-batch loss.
        valid_T: False for padding tokens (excluded from P).
    Returns 0 when nothing was routed. No host synchronisation (safe in a compiled/CUDA graph).
    """
    E = probs_TE.shape[-1]
    counts_E = counts_E.detach().to(device=probs_TE.device, dtype=torch.float32)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)  # no host sync: all-zero counts give f = 0
    P_E = _mean_over_valid(normalize_probs(probs_TE), valid_T)
    return E * (f_E * P_E).sum()


def sequence_aux_loss(probs_BLE: Tensor, counts_BE: Tensor, valid_BL: Tensor | None = None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the Switch loss per sequence, averaged over sequences.

    ``counts_BE`` are the routed slots of each sequence's real tokens. Sequences with no real token
    (or nothing routed) are left out of the average. 1.0 when every sequence is balanced.
    """
    B, L, E = probs_BLE.shape
    p_BLE = normalize_probs(probs_BLE)
    if valid_BL is None:
        valid_BL = torch.ones(B, L, dtype=torch.bool, device=probs_BLE.device)
    w_BL = valid_BL.to(p_BLE.dtype)
    n_B = w_BL.sum(1)
    P_BE = (p_BLE * w_BL[..., None]).sum(1) / n_B.clamp_min(1.0)[:, None]
    counts_BE = counts_BE.detach().to(device=probs_BLE.device, dtype=torch.float32)
    total_B = counts_BE.sum(1)
    f_BE = counts_BE / total_B.clamp_min(1.0)[:, None]
    loss_B = E * (f_BE * P_BE).sum(1)
    used_B = ((n_B > 0) & (total_B > 0)).to(loss_B.dtype)
    return (loss_B * used_B).sum() / used_B.sum().clamp_min(1.0)


def unipool_switch_loss(scores_TE: Tensor, counts_E: Tensor, k: int, valid_T: Tensor | None = None,
                        count_tokens: float | Tensor | None = None) -> Tensor:
    """UniPool's form of the Switch loss (NormRouter in UniPool's Megatron-LM code): raw scores.

    Megatron's ``switch_load_balancing_loss_func(probs=scores, tokens_per_expert=c, T, topk=k, E)``
    ``= E / (k T^2) * sum_i c_i * sum_t s_ti``, i.e. ``E * sum_i (c_i / (k T)) * (sum_t s_ti / T)``
    with the router's *raw* scores ``s`` (for NormRouter: ``scale * ReLU(z / ||z||)``, not
    renormalised per token), so the loss is not 1.0 at balance and its gradient reaches every
    factor of the scores (NormRouter's learnable ``norm_scale`` included). ``T`` = real tokens;
    ``count_tokens`` = the real tokens ``counts_E`` come from (default ``T``; the global-batch
    loss passes the step's tokens so far). No host synchronisation.
    """
    E = scores_TE.shape[-1]
    s_TE = scores_TE.float()
    if valid_T is None:
        n = torch.tensor(float(s_TE.shape[0]), device=s_TE.device)
    else:
        w_T = valid_T.to(s_TE.dtype)
        s_TE, n = s_TE * w_T[:, None], w_T.sum()
    n_c = n if count_tokens is None else torch.as_tensor(count_tokens, dtype=torch.float32, device=s_TE.device)
    f_E = counts_E.detach().to(device=s_TE.device, dtype=torch.float32) / (k * n_c).clamp_min(1.0)
    return E * (f_E * s_TE.sum(0)).sum() / n.clamp_min(1.0)


def unipool_sequence_loss(scores_BLE: Tensor, counts_BE: Tensor, k: int, valid_BL: Tensor | None = None) -> Tensor:
    """Megatron's ``seq_aux_loss`` in UniPool's form: :func:`unipool_switch_loss` per sequence, averaged
    over the sequences that have real tokens."""
    B, L, E = scores_BLE.shape
    if valid_BL is None:
        valid_BL = torch.ones(B, L, dtype=torch.bool, device=scores_BLE.device)
    w_BL = valid_BL.to(torch.float32)
    n_B = w_BL.sum(1)
    s_BE = (scores_BLE.float() * w_BL[..., None]).sum(1)
    f_BE = counts_BE.detach().to(device=s_BE.device, dtype=torch.float32) / (k * n_B).clamp_min(1.0)[:, None]
    loss_B = E * (f_BE * s_BE).sum(1) / n_B.clamp_min(1.0)
    used_B = (n_B > 0).to(loss_B.dtype)
    return (loss_B * used_B).sum() / used_B.sum().clamp_min(1.0)


def global_aux_value(count_sum_E: Tensor, prob_sum_E: Tensor, num_tokens: float | Tensor) -> Tensor:
    """The global-batch balance loss from sums accumulated over micro-batches (no gradient).

    ``E * sum_i (C_i / sum_j C_j) * (Psum_i / N)`` where ``C`` are routed slots, ``Psum`` the summed
    normalised probabilities and ``N`` the real tokens of the whole optimizer step. Built from sums
    only, it is invariant to how the step's tokens are split into micro-batches (exactly, up to
    floating-point summation order). 1.0 at perfect balance.
    """
    E = count_sum_E.shape[-1]
    C = count_sum_E.double()
    n = float(num_tokens)
    if float(C.sum()) == 0.0 or n == 0.0:
        return C.new_zeros(())
    return E * ((C / C.sum()) * (prob_sum_E.double() / n)).sum()


def z_loss(logits_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over real tokens of logsumexp(logits)^2."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    sq_T = lse_T.square()
    if valid_T is None:
        return sq_T.sum() / max(sq_T.shape[0], 1)
    w_T = valid_T.to(sq_T.dtype)
    return (sq_T * w_T).sum() / w_T.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- coefficient converters
def hf_to_moelab_coef(coef: float, k: int) -> float:
    """Hugging Face's aux loss equals k at balance (ours 1): HF coef c acts like c*k here."""
    return coef * k


def moelab_to_hf_coef(coef: float, k: int) -> float:
    """Inverse of :func:`hf_to_moelab_coef`."""
    return coef / k


def megatron_to_moelab_coef(coef: float) -> float:
    """Megatron's ``moe_aux_loss_coeff``: its loss equals 1 at balance like ours, so unchanged."""
    return coef


# --------------------------------------------------------------------------- per-step state
class StepAccumulator(nn.Module):
    """Base of modules that accumulate over one optimizer step and act at its end.

    ``observe`` runs only in training mode with grad enabled (so evaluation and no-grad forwards do
    not count); ``step_update`` is called once per optimizer step by :func:`install_aux_free_hook`.
    """

    def accumulating(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def observe(self, routing: "RoutingResult") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def step_update(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _apply(self, fn: Any, recurse: bool = True) -> "StepAccumulator":
        # Keep the fp32/fp64 state in its dtype under model.to(bfloat16): a 1e-3 bias step is below
        # bf16 resolution. Only the device follows ``fn``.
        old = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, before in old.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self


class AuxFreeBias(StepAccumulator):
    """Auxiliary-loss-free load balancing bias (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

    ``bias_E`` (fp32, saved in checkpoints) is added to the routing scores only to choose experts;
    the combine weights never include it. ``load_E`` accumulates routed slots per expert from real
    tokens over all micro-batches of one optimizer step. :meth:`step_update` applies
    ``b_i += rate * sign(mean(load) - load_i)``, re-centres the update to zero mean (as torchtitan does;
    Megatron does not re-centre) and resets the load. Steps that saw no tokens leave the bias alone.

    Since ``sign`` is scale-free, counting every micro-batch twice (activation-checkpoint
    recomputation) does not change the update.
    """

    def __init__(self, num_experts: int, rate: float = 1e-3) -> None:
        super().__init__()
        if rate < 0:
            raise MoelabError(f"bias_update_rate={rate!r} is out of range; expected bias_update_rate >= 0")
        self.num_experts = num_experts
        self.rate = float(rate)
        self.register_buffer("bias_E", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load_E", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.num_updates = 0

    def observe(self, routing: "RoutingResult") -> None:
        if self.accumulating():  # checked outside no_grad: it reads the grad mode
            with torch.no_grad():
                self.load_E += routing.routed_counts_E().to(self.load_E)

    @torch.no_grad()
    def step_update(self) -> None:
        if float(self.load_E.sum()) > 0:
            delta_E = self.rate * torch.sign(self.load_E.mean() - self.load_E)
            self.bias_E += delta_E - delta_E.mean()
            self.num_updates += 1
        self.load_E.zero_()


class GlobalLoadAccumulator(StepAccumulator):
    """Sums over the micro-batches of one optimizer step for the global-batch balance loss.

    Holds ``count_E`` (routed slots, real tokens), ``prob_sum_E`` (summed normalised probabilities,
    detached) and ``tokens`` (real tokens), in float64 so the sums are split-invariant. Reset by
    :meth:`step_update` (the optimizer hook). :meth:`value` is :func:`global_aux_value` of the sums.
    Single process: a data-parallel trainer would all-reduce the counts before use (Megatron does).
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("count_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("prob_sum_E", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    def observe(self, routing: "RoutingResult") -> None:
        if not self.accumulating() or routing.probs_TE is None:
            return
        with torch.no_grad():
            self._add(routing)

    def _add(self, routing: "RoutingResult") -> None:
        self.count_E += routing.routed_counts_E().to(self.count_E)
        p_TE = normalize_probs(routing.probs_TE.detach()).double()
        if routing.valid_T is not None:
            p_TE = p_TE[routing.valid_T]
        self.prob_sum_E += p_TE.sum(0)
        self.tokens += p_TE.shape[0]

    def value(self) -> Tensor:
        return global_aux_value(self.count_E, self.prob_sum_E, self.tokens)

    @torch.no_grad()
    def step_update(self) -> None:
        self.count_E.zero_()
        self.prob_sum_E.zero_()
        self.tokens.zero_()


def install_aux_free_hook(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    """Run every :class:`StepAccumulator` of ``model`` once per ``optimizer.step()`` (a step pre-hook).

    Updates every :class:`AuxFreeBias` from the load of the whole step (all micro-batches of
    gradient accumulation) and resets it and every :class:`GlobalLoadAccumulator`. Modules are looked
    up at each step, so layers added after installation are covered. Returns the hook handle
    (``handle.remove()`` uninstalls it).
    """

    def _pre_step(opt: Any, args: Any, kwargs: Any) -> None:
        for m in model.modules():
            if isinstance(m, StepAccumulator):
                m.step_update()

    return optimizer.register_step_pre_hook(_pre_step)


# --------------------------------------------------------------------------- layer entry point
def _valid(routing: "RoutingResult", ctx: "RoutingContext | None") -> Tensor | None:
    if routing.valid_T is not None:
        return routing.valid_T
    return None if ctx is None else ctx.valid_T


def sequence_counts_BE(routing: "RoutingResult", batch_shape: tuple[int, int], valid_T: Tensor | None) -> Tensor:
    """Routed slots per (sequence, expert) from real tokens, before drops (long ``[B, E]``)."""
    B, L = batch_shape
    E = routing.num_experts
    m_S = torch.ones_like(routing.token_S, dtype=torch.bool) if valid_T is None else valid_T[routing.token_S]
    seq_S = routing.token_S[m_S] // L
    return torch.bincount(seq_S * E + routing.expert_S[m_S], minlength=B * E).view(B, E)


def balance_losses(
    routing: "RoutingResult",
    cfg: "MoEConfig",
    ctx: "RoutingContext | None" = None,
    *,
    accumulator: GlobalLoadAccumulator | None = None,
) -> dict[str, Tensor]:
    """The configured balance losses of one layer, already multiplied by their coefficients.

    Keys: ``"aux_loss"`` (``cfg.aux_loss_coef`` times the ``cfg.aux_loss`` loss; absent for ``none``
    or a zero coefficient) and ``"z_loss"`` (``cfg.z_loss_coef`` times the z-loss; absent when 0 or
    the router has no logits). Losses the router owns are in ``routing.aux_losses`` (not repeated).

    ``aux_loss="global"`` needs ``accumulator`` (the router's ``global_load``; pass it or call
    ``router.balance_losses(routing, ctx)``). Per micro-batch it returns ``E * sum_i f_i * P_i`` with
    ``f`` from the slots accumulated so far in this optimizer step (this micro-batch included, the
    router observed it already) and ``P`` from this micro-batch, as Megatron does. Its gradient is
    ``E * f_i / N_mb`` per real token and expert; with the trainer scaling each micro-batch by
    1/grad_accum the summed gradient is that of the global-batch loss with the running ``f``, exact
    once ``f`` is complete. The exact, split-invariant value of the step is
    ``accumulator.value()`` (:func:`global_aux_value`). Outside training (or with grad disabled)
    nothing is accumulated and the loss is the micro-batch Switch loss.

    Routings with ``loss_form == "unipool"`` (NormRouter's default) use UniPool's form of each loss
    (:func:`unipool_switch_loss`, :func:`unipool_sequence_loss`; global: ``f`` from the step's
    accumulated counts over ``k`` times its accumulated tokens, Megatron's averaged counts when
    micro-batches have equal sizes); z-loss is the same in both forms.
    """
    check_choice("aux_loss", cfg.aux_loss, AUX_LOSSES)
    out: dict[str, Tensor] = {}
    valid_T = _valid(routing, ctx)
    if cfg.aux_loss != "none" and cfg.aux_loss_coef != 0.0:
        if routing.probs_TE is None:
            raise MoelabError(
                f"aux_loss={cfg.aux_loss!r} needs router probabilities (routing.probs_TE is None); "
                "use aux_loss='none' with this router"
            )
        out["aux_loss"] = cfg.aux_loss_coef * _aux_loss(routing, cfg, ctx, valid_T, accumulator)
    if cfg.z_loss_coef != 0.0 and routing.logits_TE is not None:
        out["z_loss"] = cfg.z_loss_coef * z_loss(routing.logits_TE, valid_T)
    return out


def _aux_loss(routing: "RoutingResult", cfg: "MoEConfig", ctx: "RoutingContext | None", valid_T: Tensor | None,
              accumulator: GlobalLoadAccumulator | None) -> Tensor:
    """The ``cfg.aux_loss`` loss (no coefficient) in the routing's ``loss_form``."""
    probs_TE, unipool, k = routing.probs_TE, routing.loss_form == "unipool", cfg.k
    if cfg.aux_loss == "switch":
        counts_E = routing_counts(routing, valid_T)
        if unipool:
            return unipool_switch_loss(probs_TE, counts_E, k, valid_T)
        return switch_aux_loss(probs_TE, counts_E, valid_T)
    if cfg.aux_loss == "sequence":
        if ctx is None or ctx.batch_shape is None:
            raise MoelabError("aux_loss='sequence' needs ctx.batch_shape=(B, L); got None")
        B, L = ctx.batch_shape
        if B * L != routing.num_tokens:
            raise MoelabError(f"ctx.batch_shape={ctx.batch_shape} does not match T={routing.num_tokens}")
        counts_BE = sequence_counts_BE(routing, (B, L), valid_T)
        valid_BL = None if valid_T is None else valid_T.view(B, L)
        if unipool:
            return unipool_sequence_loss(probs_TE.view(B, L, -1), counts_BE, k, valid_BL)
        return sequence_aux_loss(probs_TE.view(B, L, -1), counts_BE, valid_BL)
    if accumulator is None:  # global
        raise MoelabError("aux_loss='global' needs accumulator=router.global_load (or router.balance_losses())")
    count_tokens = None
    if accumulator.accumulating():  # the router already added this micro-batch
        counts_E, count_tokens = accumulator.count_E, accumulator.tokens
    else:
        counts_E = routing_counts(routing, valid_T)
    if unipool:
        return unipool_switch_loss(probs_TE, counts_E, k, valid_T, count_tokens)
    return switch_aux_loss(probs_TE, counts_E, valid_T)


def routing_counts(routing: "RoutingResult", valid_T: Tensor | None) -> Tensor:
    """Routed slots per expert from real tokens, before drops."""
    m_S = torch.ones_like(routing.token_S, dtype=torch.bool) if valid_T is None else valid_T[routing.token_S]
    return torch.bincount(routing.expert_S[m_S], minlength=routing.num_experts)

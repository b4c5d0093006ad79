"""The MoE feed-forward layer: router -> balancing -> experts -> dispatch.

Shape legend: T tokens (leading dims flattened), D model dim, E experts, S routed slots.

Example (runs as is)::

    import torch
    from moelab.layers.config import MoEConfig
    from moelab.layers.moe import MoELayer

    layer = MoELayer(MoEConfig(d_model=64, d_ff=128, num_experts=4, k=2))
    x = torch.randn(2, 10, 64)
    y = layer(x)                      # [2, 10, 64]
    y.pow(2).mean().backward()        # the balance loss's gradient reaches the router too
    print(layer.last_aux, layer.last_stats["counts"])

Balance losses reach the objective without a flag and without global lists: the layer attaches
their sum to its output's autograd graph with ``AttachAuxLoss`` (Megatron-LM's
``MoEAuxLossAutoScaler``): identity on the output in forward; in backward it also sends
``layer.aux_loss_scale`` as the gradient of the summed aux loss. Any loss computed from the
output therefore trains the router as if ``aux_loss_scale * sum(aux)`` had been added to it. The
trainer sets ``aux_loss_scale = 1 / grad_accum_steps`` so the accumulated gradient is the mean's.
The layer never adds the aux loss's *value* to the output; read it from ``last_aux``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.balancing import balance_losses
from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import DISPATCHERS, DROP_POLICIES, apply_capacity, expert_capacity, pick_dispatcher
from moelab.layers.experts import ExpertBank, SharedExperts
from moelab.layers.routers import build_router
from moelab.layers.routers.base import Router
from moelab.layers.routing import RoutingContext, RoutingResult
from moelab.layers.stats import routing_stats


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``y``; backward returns ``scale`` as the gradient of the scalar ``aux``.

    Megatron-LM ``MoEAuxLossAutoScaler`` (moe_utils.py): the auxiliary loss rides on the
    output's graph, so ``loss(y).backward()`` also back-propagates ``scale * aux``.
    """

    @staticmethod
    def forward(ctx, y: Tensor, aux: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        shape, dtype, device = ctx.aux_meta
        return gy, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def _detach_routing(r: RoutingResult) -> RoutingResult:
    def d(t: Any) -> Any:
        return t.detach() if isinstance(t, Tensor) else t

    return RoutingResult(
        token_S=r.token_S.detach(), expert_S=r.expert_S.detach(), weight_S=r.weight_S.detach(),
        num_tokens=r.num_tokens, num_experts=r.num_experts, logits_TE=d(r.logits_TE),
        probs_TE=d(r.probs_TE), k=r.k, keep_S=d(r.keep_S), selection_bias_E=d(r.selection_bias_E),
        valid_T=d(r.valid_T), aux_losses={n: v.detach() for n, v in r.aux_losses.items()}, causal=r.causal,
        loss_form=r.loss_form,
    )


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN (Shazeer et al. 2017; GShard; Switch; DeepSeekMoE shared experts).

    ``MoELayer(cfg, experts=None)``: builds ``build_router(cfg)``, its own ``ExpertBank(cfg)``
    unless a bank is passed in (the UniPool shared pool passes one bank to many layers; the bank
    must match ``d_model`` and ``num_experts``), and ``SharedExperts(cfg)`` when
    ``cfg.num_shared_experts > 0``. Dispatch is ``cfg.dispatch`` ("auto" picks the fastest
    correct backend for the input's device); with ``cfg.capacity_factor`` set, slots over each
    expert's capacity are dropped first (``apply_capacity`` with ``cfg.drop_policy``).

    ``forward(x[..., D], ctx=None) -> y[..., D]``. After each forward: ``last_routing``
    (detached RoutingResult), ``last_aux`` (name -> detached scalar: ``balance_losses`` plus the
    router's own ``routing.aux_losses``), ``last_stats`` (``routing_stats``).

    ``last_stats`` is computed on its first read after the forward (from that forward's routing;
    ``routing_stats`` costs several host syncs, and most forwards are never inspected), and so is
    ``last_aux`` of a forward without grad when ``balance`` only reads the routing and context
    (this class's ``balance``, the base ``Router.balance_losses``, ``aux_loss`` not ``"global"``).
    The values are the same as computed eagerly.

    Seam: a router defining ``forward_layer(layer, x_TD, ctx) -> (y_TD, routing)`` computes the
    routed output itself (SMEAR, Chain-of-Experts); shared experts, balance losses and stats are
    still applied by the layer.
    """

    def __init__(self, cfg: MoEConfig, experts: ExpertBank | None = None) -> None:
        super().__init__()
        check_choice("dispatch", cfg.dispatch, ["auto", *DISPATCHERS.names()])
        check_choice("drop_policy", cfg.drop_policy, DROP_POLICIES)
        if cfg.capacity_factor is not None:
            expert_capacity(cfg.capacity_factor, 1, 1)  # raises for <= 0
        elif cfg.dispatch == "capacity":
            raise MoelabError("dispatch='capacity' needs capacity_factor > 0; got capacity_factor=None")
        check_range("routed_scale", cfg.routed_scale, low=0.0, low_inclusive=False)
        self.cfg = cfg
        self.router = build_router(cfg)
        if experts is None:
            experts = ExpertBank(cfg)
        elif experts.d_model != cfg.d_model or experts.num_experts != cfg.num_experts:
            raise MoelabError(
                f"experts has d_model={experts.d_model}, num_experts={experts.num_experts}; expected "
                f"d_model={cfg.d_model}, num_experts={cfg.num_experts}"
            )
        self.experts = experts
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        self.aux_loss_scale = 1.0
        self.last_routing: RoutingResult | None = None
        self.last_aux = {}
        self.last_stats = {}
        self.track_stats = True  # False: skip last_stats (and, without grad, last_aux): token-by-token decoding

    # ------------------------------------------------------------ bookkeeping, computed on first read
    # (plain attributes written straight into __dict__: nn.Module.__setattr__ costs microseconds)
    @property
    def last_stats(self) -> dict[str, Any]:
        d = self.__dict__
        if d.get("_pending_stats") is not None:
            d["_last_stats"], d["_pending_stats"] = routing_stats(d["_pending_stats"]), None
        return d["_last_stats"]

    @last_stats.setter
    def last_stats(self, value: dict[str, Any]) -> None:
        self.__dict__.update(_pending_stats=None, _last_stats=value)

    @property
    def last_aux(self) -> dict[str, Tensor]:
        d = self.__dict__
        pending = d.get("_pending_aux")
        if pending is not None:
            d["_pending_aux"] = None
            with torch.no_grad():
                d["_last_aux"] = {n: v.detach() for n, v in self.balance(*pending).items()}
        return d["_last_aux"]

    @last_aux.setter
    def last_aux(self, value: dict[str, Tensor]) -> None:
        self.__dict__.update(_pending_aux=None, _last_aux=value)

    def _balance_reads_only_routing(self) -> bool:
        """Whether ``balance`` is a pure function of (routing, ctx), so it may run later."""
        return (type(self).balance is MoELayer.balance and self.cfg.aux_loss != "global"
                and getattr(type(self.router), "balance_losses", None) is Router.balance_losses)

    def _record(self, routing: RoutingResult, ctx: RoutingContext | None, aux: dict[str, Tensor] | None) -> None:
        """Set ``last_routing`` now; ``last_aux`` (``aux`` None: deferred) and ``last_stats`` lazily."""
        r = _detach_routing(routing)
        b = r.selection_bias_E  # stats get a snapshot of the bias: the optimizer step updates it in place
        self.__dict__.update(
            last_routing=r, _last_stats={}, _last_aux={} if aux is None else {n: v.detach() for n, v in aux.items()},
            _pending_aux=(routing, ctx) if aux is None else None,
            _pending_stats=(r if b is None else replace(r, selection_bias_E=b.clone())) if self.track_stats else None)

    @property
    def block_residual(self) -> bool:
        """Whether the transformer block adds its residual to this layer's output (False for a
        router whose output already is the new residual stream: Chain-of-Experts ``residual="inner"``)."""
        return bool(getattr(self.router, "block_residual", True))

    def route(self, x_TD: Tensor, ctx: RoutingContext | None) -> RoutingResult:
        routing = self.router(x_TD, ctx)
        if self.cfg.capacity_factor is not None:
            routing = apply_capacity(routing, self.cfg.capacity_factor, self.cfg.drop_policy)
        return routing

    def dispatch(self, x_TD: Tensor, routing: RoutingResult) -> Tensor:
        routed = getattr(self.experts, "forward_routed", None)  # banks with their own FFN (experts_ext)
        if routed is not None:
            return routed(x_TD, routing)
        return pick_dispatcher(self.cfg.dispatch, x_TD.device)(x_TD, routing, self.experts)

    def balance(self, routing: RoutingResult, ctx: RoutingContext | None) -> dict[str, Tensor]:
        rb = getattr(self.router, "balance_losses", None)
        losses = dict(rb(routing, ctx) if rb is not None else balance_losses(routing, self.cfg, ctx))
        for name, v in routing.aux_losses.items():
            losses[name] = losses[name] + v if name in losses else v
        return losses

    def _check_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the experts compute in: their parameters'. A different input dtype is refused by
        name, except under autocast, where the input is cast to it (the output is cast back; autocast
        does not cover the grouped matmul). Router math is fp32 whatever the dtype."""
        banks = getattr(self.experts, "banks", None)  # a pool window: read the bank (no concatenation)
        w = banks[0].w_up_EFD if banks else self.experts.w_up_EFD
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise MoelabError(
                f"x has dtype {x.dtype} but the MoE layer's expert parameters are {w.dtype}; expected x.dtype="
                f"{w.dtype}: cast the input (x.to({w.dtype})), the layer (layer.to({x.dtype})), or run under "
                "torch.autocast"
            )
        return w.dtype

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        D = self.cfg.d_model
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != D:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise MoelabError(f"x has shape {shape}; expected [..., d_model={D}]")
        if not x.is_floating_point():
            raise MoelabError(f"x has dtype {x.dtype}; expected a floating dtype")
        x_TD = x.reshape(-1, D).to(self._check_dtype(x))
        forward_layer = getattr(self.router, "forward_layer", None)
        if forward_layer is not None:
            y_TD, routing = forward_layer(self, x_TD, ctx)
        else:
            routing = self.route(x_TD, ctx)
            y_TD = self.dispatch(x_TD, routing)
        if self.cfg.routed_scale != 1.0:
            y_TD = y_TD * self.cfg.routed_scale
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        y_TD, aux = self._attach_balance(y_TD, routing, ctx)
        self._record(routing, ctx, aux)
        return y_TD.reshape(x.shape).to(x.dtype)

    def _attach_balance(self, y_TD: Tensor, routing: RoutingResult,
                        ctx: RoutingContext | None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Balance losses onto ``y_TD``'s graph; the losses, or None when they are deferred to
        the first read of ``last_aux`` (no grad, pure ``balance``)."""
        grad = torch.is_grad_enabled()
        if not grad:  # generation (moelab.models.generation) turns track_stats off: no reporting-only values
            return y_TD, (None if self.track_stats and self._balance_reads_only_routing() else
                          self.balance(routing, ctx) if self.track_stats else {})
        aux = self.balance(routing, ctx)
        if aux:
            total = sum(v.float() for v in aux.values())
            if total.requires_grad:
                y_TD = AttachAuxLoss.apply(y_TD, total, self.aux_loss_scale)
        return y_TD, aux

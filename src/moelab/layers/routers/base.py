"""Router base class, registry and the reusable pieces every router is built from.

Shape legend: T tokens, D model dim, E experts, K top-k, G expert groups.

A router maps hidden states ``x_TD`` to a :class:`~moelab.layers.routing.RoutingResult`. To add one,
write one file in this folder::

    @ROUTERS.register("my_router", description="one line", paper="Author et al. 2025")
    class MyRouter(Router):
        def __init__(self, cfg, *, my_option=1.0):   # router_kwargs are keyword-only parameters
            super().__init__(cfg)
            self.gate = GateLinear(cfg.d_model, cfg.num_experts, cfg.init_std)
        def forward(self, x_TD, ctx=None):
            x_TD = self.check_input(x_TD)
            logits_TE = check_finite_logits(self.gate(x_TD), "my_router")
            ...
            return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=..., probs_TE=...)

The base class does the bookkeeping after every forward (a forward hook, so subclasses need not
call anything): it fills ``valid_T`` from the context, fills ``selection_bias_E`` and ``causal``,
and feeds the per-step accumulators (aux-free bias load, global-batch balance counts), which count
only in training mode with grad enabled and never count padding.

Router math is fp32 whatever the input dtype (:class:`GateLinear` casts x and the weight and turns
autocast off): bf16 logits flip top-k choices and break balance (Megatron, vLLM and SGLang all
moved routers to fp32).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.balancing import AUX_LOSSES, AuxFreeBias, GlobalLoadAccumulator, balance_losses
from moelab.layers.config import MoEConfig
from moelab.layers.routing import RoutingContext, RoutingResult
from moelab.registry import Registry

ROUTERS: Registry[type["Router"]] = Registry("router")


# --------------------------------------------------------------------------- reusable pieces
class GateLinear(nn.Module):
    """A bias-free linear gate ``logits_TE = x_TD @ weight_ED.T`` computed in fp32.

    ``init_std=0`` initialises to zeros (Shazeer et al. 2017 do so for W_g and W_noise).
    """

    def __init__(self, d_model: int, num_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        if init_std > 0:
            nn.init.normal_(self.weight_ED, std=init_std)
        else:
            nn.init.zeros_(self.weight_ED)

    def forward(self, x_TD: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x_TD.device.type):  # no context manager to enter (hot path)
            return F.linear(x_TD.float(), self.weight_ED.float())
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight_ED.float())


CHECK_FINITE = True  # set False to skip the check (it costs one device->host sync per router call)


def check_finite_logits(logits_TE: Tensor, router: str) -> Tensor:
    """Raise MoelabError if router logits contain NaN or inf (a diverged model or bad input)."""
    if CHECK_FINITE and not bool(torch.isfinite(logits_TE.detach()).all()):
        n_bad = int((~torch.isfinite(logits_TE.detach())).sum())
        raise MoelabError(
            f"router {router!r}: logits_TE has {n_bad} non-finite values (NaN/inf); "
            "expected finite router logits (check the input hidden states and the learning rate)"
        )
    return logits_TE


def select_topk(scores_TE: Tensor, k: int, bias_E: Tensor | None = None,
                allowed_TE: Tensor | None = None) -> Tensor:
    """Indices ``[T, K]`` of the top-k of ``scores_TE + bias_E`` among allowed experts.

    The bias (aux-loss-free balancing) only changes which experts are chosen: callers gather the
    combine weights from the unbiased scores with these indices. Selection is done without gradient.
    """
    with torch.no_grad():
        sel_TE = scores_TE.detach().float()
        if bias_E is not None:
            sel_TE = sel_TE + bias_E.to(sel_TE)
        if allowed_TE is not None:
            sel_TE = sel_TE.masked_fill(~allowed_TE, float("-inf"))
        return torch.topk(sel_TE, k, dim=-1, sorted=True).indices


def group_limited_mask(scores_TE: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """DeepSeek-V3 node-limited routing: the experts of the ``topk_groups`` best of ``n_groups``
    contiguous groups, a group scored by the sum of its top-2 scores (top-1 for groups of one).

    Returns bool ``[T, E]``.
    """
    T, E = scores_TE.shape
    per_group = E // n_groups
    s_TGe = scores_TE.detach().view(T, n_groups, per_group)
    group_score_TG = s_TGe.topk(min(2, per_group), dim=-1).values.sum(-1)
    top_groups_TG = group_score_TG.topk(topk_groups, dim=-1).indices
    gmask_TG = torch.zeros(T, n_groups, dtype=torch.bool, device=scores_TE.device)
    gmask_TG.scatter_(1, top_groups_TG, True)
    return gmask_TG[:, :, None].expand(T, n_groups, per_group).reshape(T, E)


# --------------------------------------------------------------------------- base class
class Router(nn.Module):
    """Base router: holds the config, the optional aux-free bias and the per-step accumulators.

    Class attributes: ``causal`` (False when, in training mode, a token's routing depends on
    later tokens of its sequence), ``causal_eval`` (the same in eval mode; None: as ``causal``;
    Sinkhorn, BASE and BIP are non-causal in training only) and ``supports_aux_free`` (False for
    routers whose selection has no per-expert score to bias). :meth:`is_causal` answers for the
    current (or a given) mode; routers whose causality depends on their options override it.
    Subclasses take their ``router_kwargs`` as keyword-only ``__init__`` parameters.
    """

    causal: ClassVar[bool] = True
    causal_eval: ClassVar[bool | None] = None
    supports_aux_free: ClassVar[bool] = True

    def __init__(self, cfg: MoEConfig, **router_kwargs: Any) -> None:
        super().__init__()
        if router_kwargs:
            raise MoelabError(
                f"router {type(self).__name__} got unknown router_kwargs {sorted(router_kwargs)}; "
                f"choose from: {', '.join(router_kwarg_names(type(self))) or '(none)'}"
            )
        self.cfg = cfg
        self.d_model = cfg.d_model
        self.num_experts = cfg.num_experts
        self.k = cfg.k
        if cfg.aux_free_bias and not self.supports_aux_free:
            raise MoelabError(
                f"aux_free_bias=True is not supported by router {type(self).__name__}; "
                "choose aux_free_bias=False"
            )
        self.aux_free: AuxFreeBias | None = (
            AuxFreeBias(cfg.num_experts, cfg.bias_update_rate) if cfg.aux_free_bias else None
        )
        self.global_load: GlobalLoadAccumulator | None = (
            GlobalLoadAccumulator(cfg.num_experts) if cfg.aux_loss == "global" else None
        )
        self.register_forward_hook(Router._after_forward, with_kwargs=True)

    # -- helpers for subclasses
    def selection_bias(self) -> Tensor | None:
        """The aux-free bias ``[E]`` to add to scores when selecting, or None."""
        return None if self.aux_free is None else self.aux_free.bias_E

    def check_input(self, x_TD: Tensor) -> Tensor:
        """Raise MoelabError unless ``x_TD`` is a floating ``[T, d_model]`` tensor."""
        if not isinstance(x_TD, Tensor):
            raise MoelabError(f"x_TD must be a torch.Tensor, got {type(x_TD).__name__}")
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.d_model:
            raise MoelabError(
                f"x_TD has shape {tuple(x_TD.shape)}; expected [T, d_model={self.d_model}] (flatten batch dims first)"
            )
        if not x_TD.is_floating_point():
            raise MoelabError(f"x_TD has dtype {x_TD.dtype}; expected a floating dtype (float32, bfloat16, float16)")
        return x_TD

    def balance_losses(self, routing: RoutingResult, ctx: RoutingContext | None = None) -> dict[str, Tensor]:
        """:func:`moelab.layers.balancing.balance_losses` with this router's global accumulator."""
        return balance_losses(routing, self.cfg, ctx, accumulator=self.global_load)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:  # pragma: no cover
        raise NotImplementedError

    def is_causal(self, training: bool | None = None) -> bool:
        """True when a token's routing never depends on later tokens, in training mode
        (``training=True``), eval mode (False) or the router's current mode (None)."""
        mode = self.training if training is None else bool(training)
        cls = type(self)
        return cls.causal if mode or cls.causal_eval is None else bool(cls.causal_eval)

    # -- bookkeeping after every forward
    @staticmethod
    def _after_forward(module: "Router", args: tuple, kwargs: dict, out: Any) -> Any:
        if not isinstance(out, RoutingResult):
            return out
        ctx = kwargs.get("ctx", args[1] if len(args) > 1 else None)
        return module.finish_routing(out, ctx)

    def finish_routing(self, out: RoutingResult, ctx: RoutingContext | None,
                       global_load: GlobalLoadAccumulator | None | str = "router") -> RoutingResult:
        """Fill ``valid_T``, ``selection_bias_E`` and ``causal`` and feed the step accumulators.

        Runs after every ``forward`` (a hook). Routers that execute a routing not made by
        ``forward`` (Chain-of-Experts iterations, CompeteSMoE's competition step) call it on that
        routing themselves, passing the accumulator the routing belongs to (``global_load``:
        "router" for ``self.global_load``, None for none), so ``aux_loss="global"`` reads the
        counts of the routing it balances.
        """
        if out.valid_T is None and ctx is not None and ctx.valid_T is not None:
            valid_T = ctx.valid_T.reshape(-1).to(torch.bool)
            if valid_T.numel() != out.num_tokens:
                raise MoelabError(f"ctx.valid_T has {valid_T.numel()} entries, expected T={out.num_tokens}")
            out.valid_T = valid_T
        if self.aux_free is not None and out.selection_bias_E is None:
            out.selection_bias_E = self.aux_free.bias_E.detach()
        if not self.is_causal():
            out.causal = False
        if self.aux_free is not None:
            self.aux_free.observe(out)
        acc = self.global_load if isinstance(global_load, str) else global_load
        if acc is not None:
            acc.observe(out)
        return out


def router_kwarg_names(cls: type) -> list[str]:
    """The keyword-only ``__init__`` parameters of a router class (its valid ``router_kwargs``)."""
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def validate_config(cfg: MoEConfig) -> None:
    """Check the parts of ``cfg`` routing depends on; raise MoelabError naming param, value, choices."""
    check_choice("router", cfg.router, ROUTERS.names())
    for name in ("d_model", "num_experts"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise MoelabError(f"{name}={v!r} must be an int")
        check_range(name, v, low=1)
    if not isinstance(cfg.k, int) or isinstance(cfg.k, bool):
        raise MoelabError(f"k={cfg.k!r} must be an int")
    check_range("k", cfg.k, low=1, high=cfg.num_experts)
    check_choice("aux_loss", cfg.aux_loss, AUX_LOSSES)
    check_range("aux_loss_coef", cfg.aux_loss_coef, low=0.0)
    check_range("z_loss_coef", cfg.z_loss_coef, low=0.0)
    check_range("bias_update_rate", cfg.bias_update_rate, low=0.0)
    if not isinstance(cfg.router_kwargs, dict):
        raise MoelabError(f"router_kwargs={cfg.router_kwargs!r} must be a dict")
    valid = router_kwarg_names(ROUTERS.get(cfg.router))
    for key in cfg.router_kwargs:
        if key not in valid:
            raise MoelabError(
                f"router_kwargs key {key!r} is not valid for router {cfg.router!r}; "
                f"choose from: {', '.join(map(repr, valid)) or '(none)'}"
            )


def build_router(cfg: MoEConfig) -> Router:
    """Validate ``cfg`` and build the registered router ``cfg.router`` with ``cfg.router_kwargs``."""
    validate_config(cfg)
    try:
        return ROUTERS.get(cfg.router)(cfg, **cfg.router_kwargs)
    except TypeError as e:  # e.g. a kwarg of the wrong type that the router did not check itself
        raise MoelabError(f"router {cfg.router!r} rejected router_kwargs={cfg.router_kwargs!r}: {e}") from e

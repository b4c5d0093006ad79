"""How expert capacity is distributed across depth: pure functions for layouts.

* Expert-count schedules over depth (DynaMoE, Gülmez 2026, "DynaMoE: Dynamic Token-Level Expert
  Activation with Layer-Wise Adaptive Capacity"): uniform, ascending, descending, pyramid, wave
  and hourglass (the inverse pyramid). The paper names six schedules; its abstract lists
  descending, ascending, pyramid and wave besides uniform; we add hourglass as the sixth (the
  inverse pyramid), since a schedule set closed under reversal is what the comparison needs.
  Each schedule is a shape ``s_l > 0`` over the L MoE layers; the number of experts per layer is
  ``E_l = round(budget * s_l / sum(s))`` by largest remainder, so the counts sum exactly to the
  budget, and every layer keeps at least ``min_experts`` (>= k).
* The pool-level balance loss of UniPool (Huang et al. 2026, "UniPool: A Globally Shared Expert Pool
  for Mixture-of-Experts"): the Switch form applied to utilisation aggregated over every layer that
  draws from the pool; 1.0 at perfect pool balance, like every balance loss in moelab.
* Closed-form parameter counts of the layouts, used by ``moelab info`` and checked against
  ``sum(p.numel())`` in the tests.
* :class:`LayoutConfig` (``ModelConfig.layout``) and :func:`plan_layout`, which resolves it into a
  :class:`LayoutPlan`: the banks of experts and, for every MoE layer, its router size, its k and
  the ``(bank, start, stop)`` ranges its local experts live in. Kinds: per-layer experts (vanilla,
  optionally with a DynaMoE schedule), UniPool shared pools (several pools, private experts) and
  ReXMoE cross-layer reuse (Tan et al. 2025, "ReXMoE: Reusing Experts with Minimal Overhead in
  Mixture-of-Experts": the router of layer l scores the experts of layers l-r..l+r; its progressive
  scaling routing, which unmasks the borrowed candidates gradually during training, is not
  implemented: all candidates are available from the start). The modules are built by ``moelab.layers.pool.build_layout``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the config half of this module must not load torch (CLI --help)
    from torch import Tensor

from moelab.errors import MoelabError, check_choice, check_range

SCHEDULES = ("uniform", "ascending", "descending", "pyramid", "hourglass", "wave")


def schedule_shape(kind: str, n_layers: int) -> list[float]:
    """The relative expert capacity ``s_l`` of each of ``n_layers`` MoE layers (all > 0)."""
    check_choice("schedule", kind, SCHEDULES)
    if n_layers < 1:
        raise MoelabError(f"n_layers={n_layers} must be >= 1")
    L = n_layers
    if kind == "uniform":
        return [1.0] * L
    if kind == "ascending":
        return [float(l + 1) for l in range(L)]
    if kind == "descending":
        return [float(L - l) for l in range(L)]
    if kind == "pyramid":  # peak in the middle
        return [float(min(l + 1, L - l)) for l in range(L)]
    if kind == "hourglass":  # widest at both ends
        mid = [min(l + 1, L - l) for l in range(L)]
        return [float(max(mid) + 1 - m) for m in mid]
    # wave: one period of a cosine over depth, between 0.5 and 1.5 of the mean
    return [1.0 + 0.5 * math.cos(2 * math.pi * l / L) for l in range(L)]


def expert_schedule(kind: str, n_layers: int, budget: int, *, min_experts: int = 1) -> list[int]:
    """Experts per MoE layer following ``kind``, summing exactly to ``budget``.

    Raises if the budget cannot give every layer ``min_experts`` (set it to k: a layer with
    fewer than k experts cannot route).
    """
    if budget < n_layers * min_experts:
        raise MoelabError(
            f"expert budget={budget} does not fit {n_layers} layers with at least "
            f"min_experts={min_experts} each (needs >= {n_layers * min_experts})"
        )
    shape = schedule_shape(kind, n_layers)
    # Reserve the minimum, distribute the rest proportionally (largest remainder).
    free = budget - n_layers * min_experts
    total = sum(shape)
    raw = [free * s / total for s in shape]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(n_layers), key=lambda l: (raw[l] - counts[l], -l), reverse=True)
    for l in order[: free - sum(counts)]:
        counts[l] += 1
    return [c + min_experts for c in counts]


def pool_balance_loss(counts_P: Tensor, probs_sum_P: Tensor, num_tokens: int, k: int) -> Tensor:
    """UniPool's pool-level auxiliary loss, normalised to 1.0 at perfect pool balance.

    ``counts_P``: routed slots per pool expert summed over every layer using the pool;
    ``probs_sum_P``: router probabilities per pool expert summed over those layers' real tokens;
    ``num_tokens``: the number of (layer, token) pairs summed over (T_total). With
    ``f_j = counts_j / (k T_total)`` and ``p_j = probs_sum_j / T_total`` the loss is
    ``P * sum_j f_j p_j`` — the Switch loss of the pool as a whole. A pool whose experts are
    starved across layers scores > 1 even when each layer alone looks balanced over its own
    subset.
    """
    P = counts_P.numel()
    if num_tokens <= 0:
        return probs_sum_P.sum() * 0.0
    f = counts_P.to(probs_sum_P.dtype) / (k * num_tokens)
    p = probs_sum_P / num_tokens
    return P * (f * p).sum()


def expert_params(d_model: int, d_ff: int, activation: str = "swiglu") -> int:
    """Parameters of one expert: SwiGLU has gate, up and down projections; GELU up and down."""
    check_choice("activation", activation, ("swiglu", "gelu"))
    return (3 if activation == "swiglu" else 2) * d_model * d_ff


# =========================================================================== layout configuration
LAYOUT_KINDS = ("per_layer", "shared_pool", "rexmoe")
POOL_LOSS_MODES = ("lagged_micro", "lagged", "exact")
SCHEDULE_K_MODES = ("fixed", "proportional")
ROUTER_SHARING = ("none", "omni", "decision")


@dataclass(kw_only=True)
class LayoutConfig:
    """How routed-expert capacity is laid out across depth (``ModelConfig.layout``).

    ``kind``:
        ``per_layer``   every MoE layer owns its experts (vanilla MoE). With ``schedule`` (DynaMoE)
                        the number of experts varies with depth under ``expert_budget``.
        ``shared_pool`` UniPool (Huang et al. 2026): ``n_pools`` pools of experts; the MoE layers are
                        split into ``n_pools`` contiguous groups by depth and every layer of a group
                        has its own router over its group's pool (plus ``private_experts`` of its own).
                        Pool size: ``pool_size`` experts per pool, or ``pool_fraction`` of the vanilla
                        budget (MoE layers x ``moe.num_experts``) for all pools together (default 1.0).
        ``rexmoe``      ReXMoE (Tan et al. 2025; cross-layer expert reuse): every layer owns ``E_l`` experts (the
                        schedule's, ``moe.num_experts`` by default), stored in one bank; the router of
                        layer l chooses among the experts of MoE layers l-r..l+r (r = ``rexmoe_radius``).
                        r = 0 is vanilla MoE expressed inside one bank (the oracle of the tests).
    ``pool_loss_coef`` / ``pool_loss_mode``: UniPool's pool-level balance loss over every bank that
    several layers share (``lagged_micro``, the default and what UniPool's code does: each layer's
    term uses the pool counts of the previous training micro-batch; ``lagged``: the counts of the
    previous optimizer step, all its micro-batches; ``exact``: same-micro-batch counts, computed
    once all the pool's layers ran). Per-layer balance (``moe.aux_loss``) is applied as well.
    ``schedule``/``expert_budget``/``schedule_k``: DynaMoE expert-count schedules (per_layer and
    rexmoe); ``schedule_k="proportional"`` scales k with the layer's experts (at least 1).
    ``router_sharing``: ``omni`` (Omni-Router, Gu et al. 2025: one router's weights shared by all
    MoE layers, each routing its own hidden state), ``decision`` (the first MoE layer's routing
    decision reused by every later MoE layer, passed through ``RoutingContext.state``).
    """

    kind: str = "per_layer"
    pool_size: int | None = None
    pool_fraction: float | None = None
    n_pools: int = 1
    private_experts: int = 0
    pool_loss_coef: float = 0.01
    pool_loss_mode: str = "lagged_micro"
    schedule: str = "uniform"
    expert_budget: int | None = None
    schedule_k: str = "fixed"
    rexmoe_radius: int = 1
    router_sharing: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayoutConfig":
        return cls(**d)

    def is_vanilla(self) -> bool:
        """True when the model is plain per-layer MoE (no layout machinery needed)."""
        return (self.kind == "per_layer" and self.schedule == "uniform" and self.expert_budget is None
                and self.router_sharing == "none")

    def validate(self) -> "LayoutConfig":
        check_choice("layout.kind", self.kind, LAYOUT_KINDS)
        check_choice("layout.pool_loss_mode", self.pool_loss_mode, POOL_LOSS_MODES)
        check_choice("layout.schedule", self.schedule, SCHEDULES)
        check_choice("layout.schedule_k", self.schedule_k, SCHEDULE_K_MODES)
        check_choice("layout.router_sharing", self.router_sharing, ROUTER_SHARING)
        check_range("layout.n_pools", self.n_pools, low=1)
        check_range("layout.private_experts", self.private_experts, low=0)
        check_range("layout.pool_loss_coef", self.pool_loss_coef, low=0.0)
        check_range("layout.rexmoe_radius", self.rexmoe_radius, low=0)
        if self.pool_size is not None:
            check_range("layout.pool_size", self.pool_size, low=1)
        if self.pool_fraction is not None:
            check_range("layout.pool_fraction", self.pool_fraction, low=0.0, low_inclusive=False)
        if self.pool_size is not None and self.pool_fraction is not None:
            raise MoelabError(
                f"layout.pool_size={self.pool_size} and layout.pool_fraction={self.pool_fraction} are both set; "
                "set one of them (pool_size: experts per pool; pool_fraction: of the vanilla budget)"
            )
        if self.expert_budget is not None:
            check_range("layout.expert_budget", self.expert_budget, low=1)
        return self


# =========================================================================== layout plans
@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer of a layout.

    ``layer``: block index. ``num_experts``/``k``: the layer's router size and top-k.
    ``segments``: where the router's local experts live, in order: ``(bank, start, stop)`` ranges
    of the layout's banks (local expert i is the i-th expert of the concatenated ranges); empty
    for ``per_layer``, where the layer owns its experts.
    """

    layer: int
    num_experts: int
    k: int
    segments: tuple[tuple[int, int, int], ...] = ()

    def expert_map(self, bank_offsets: list[int]) -> list[int]:
        """Global expert ids (bank offset + index) of the local experts, in order."""
        return [bank_offsets[b] + i for b, s, e in self.segments for i in range(s, e)]


@dataclass(frozen=True)
class LayoutPlan:
    """The resolved layout: banks (experts per bank, which are shared pools) and every MoE layer."""

    kind: str
    banks: tuple[int, ...]
    pooled: tuple[bool, ...]  # bank b is used by several layers (gets the pool-level loss)
    layers: tuple[LayerPlan, ...]
    vanilla_experts: int  # MoE layers x moe.num_experts: the matched vanilla budget

    @property
    def bank_offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.banks:
            out.append(acc)
            acc += n
        return out

    @property
    def routed_experts(self) -> int:
        """Distinct routed experts (the expert-parameter count divided by one expert's)."""
        if self.kind == "per_layer":
            return sum(lp.num_experts for lp in self.layers)
        return sum(self.banks)

    def layers_of_bank(self, bank: int) -> list[int]:
        return [lp.layer for lp in self.layers if any(b == bank for b, _, _ in lp.segments)]


def split_groups(n: int, groups: int) -> list[list[int]]:
    """``range(n)`` split into ``groups`` contiguous groups, sizes differing by at most one."""
    return [list(range(g * n // groups, (g + 1) * n // groups)) for g in range(groups)]


def _layer_k(layout: LayoutConfig, k: int, e_layer: int, e_ref: int) -> int:
    if layout.schedule_k == "fixed":
        return k
    return max(1, min(e_layer, round(k * e_layer / e_ref)))


def plan_layout(layout: LayoutConfig, num_experts: int, k: int, moe_layers: list[int]) -> LayoutPlan:
    """Resolve ``layout`` for MoE blocks ``moe_layers`` with ``moe.num_experts``/``moe.k``.

    Raises MoelabError (naming the key) for pools smaller than k, schedules that do not fit the
    budget, too many pools, and router sharing across layers of different sizes.
    """
    layout.validate()
    L = len(moe_layers)
    vanilla = L * num_experts
    if L == 0:
        return LayoutPlan(layout.kind, (), (), (), 0)
    budget = layout.expert_budget if layout.expert_budget is not None else vanilla
    if layout.kind in ("per_layer", "rexmoe"):
        try:
            sizes = expert_schedule(layout.schedule, L, budget, min_experts=k if layout.schedule_k == "fixed" else 1)
        except MoelabError as e:
            raise MoelabError(f"layout.schedule={layout.schedule!r} with layout.expert_budget={budget}: {e}") from None
        ks = [_layer_k(layout, k, s, num_experts) for s in sizes]
        if layout.kind == "per_layer":
            layers = tuple(LayerPlan(i, s, kk) for i, s, kk in zip(moe_layers, sizes, ks))
            plan = LayoutPlan("per_layer", (), (), layers, vanilla)
        else:
            r = layout.rexmoe_radius
            starts = [sum(sizes[:j]) for j in range(L)]
            layers = []
            for j, i in enumerate(moe_layers):
                lo, hi = max(0, j - r), min(L - 1, j + r)
                start, stop = starts[lo], starts[hi] + sizes[hi]
                layers.append(LayerPlan(i, stop - start, ks[j], ((0, start, stop),)))
            plan = LayoutPlan("rexmoe", (budget,), (r > 0 and L > 1,), tuple(layers), vanilla)
    else:  # shared_pool
        if layout.schedule != "uniform" or layout.expert_budget is not None:
            raise MoelabError(
                f"layout.schedule={layout.schedule!r} / layout.expert_budget={layout.expert_budget} apply to "
                "kinds 'per_layer' and 'rexmoe'; kind 'shared_pool' is sized by layout.pool_size or layout.pool_fraction"
            )
        G = layout.n_pools
        if G > L:
            raise MoelabError(f"layout.n_pools={G} is more than the {L} MoE layers; expected 1 <= n_pools <= {L}")
        if layout.pool_size is not None:
            P = layout.pool_size
        else:
            frac = 1.0 if layout.pool_fraction is None else layout.pool_fraction
            P = int(round(frac * vanilla / G))
        if P < k and layout.private_experts == 0 or P < 1:
            raise MoelabError(
                f"layout pool size {P} (layout.pool_size={layout.pool_size}, layout.pool_fraction="
                f"{layout.pool_fraction}, n_pools={G}) is smaller than moe.k={k}; a router cannot pick k experts "
                f"from it: expected pool_size >= {k} (pool_fraction >= {k * G / vanilla:.4g})"
            )
        banks, layers = [P] * G, []
        pooled = [len(grp) > 1 for grp in split_groups(L, G)]
        for g, grp in enumerate(split_groups(L, G)):
            for j in grp:
                segs = [(g, 0, P)]
                if layout.private_experts:
                    banks.append(layout.private_experts)
                    pooled.append(False)
                    segs.append((len(banks) - 1, 0, layout.private_experts))
                E_local = P + layout.private_experts
                if E_local < k:
                    raise MoelabError(f"layout pool size {P} + private_experts={layout.private_experts} is smaller "
                                      f"than moe.k={k}")
                layers.append(LayerPlan(moe_layers[j], E_local, k, tuple(segs)))
        plan = LayoutPlan("shared_pool", tuple(banks), tuple(pooled), tuple(layers), vanilla)
    if layout.router_sharing != "none":
        sizes = {(lp.num_experts, lp.k) for lp in plan.layers}
        if len(sizes) > 1:
            raise MoelabError(
                f"layout.router_sharing={layout.router_sharing!r} needs every MoE layer to route over the same "
                f"number of experts with the same k; this layout has (experts, k) = {sorted(sizes)}"
            )
    return plan


def layout_param_counts(plan: LayoutPlan, d_model: int, d_ff: int, activation: str = "swiglu") -> dict[str, Any]:
    """Closed-form routed-expert parameter counts of a plan, next to the matched vanilla model.

    ``routed`` = distinct routed experts x one expert's parameters; ``routed_active`` = what one
    token runs through (sum over MoE layers of k_l experts; an expert reused by two layers counts
    twice, as its FLOPs do); ``router`` = linear-gate router weights (sum of E_l x d_model);
    ``vanilla_routed`` = MoE layers x moe.num_experts experts; ``fraction`` = routed / vanilla_routed.
    """
    ep = expert_params(d_model, d_ff, activation)
    routed = plan.routed_experts * ep
    vanilla = plan.vanilla_experts * ep
    return {
        "expert_params": ep,
        "routed_experts": plan.routed_experts,
        "routed": routed,
        "routed_active": sum(lp.k for lp in plan.layers) * ep,
        "router": sum(lp.num_experts for lp in plan.layers) * d_model,
        "vanilla_experts": plan.vanilla_experts,
        "vanilla_routed": vanilla,
        "fraction": routed / vanilla if vanilla else float("nan"),
        "experts_per_layer": [lp.num_experts for lp in plan.layers],
        "k_per_layer": [lp.k for lp in plan.layers],
        "banks": list(plan.banks),
    }

"""Expert Upcycling: grow a trained E-expert MoE into an mE-expert one with top-k fixed.

Dwivedi et al. 2026, "Expert Upcycling: Shifting the Compute-Efficient Frontier of Mixture-of-Experts"
(arXiv 2604.19835): duplicate experts, extend the router by copying the duplicated experts' rows with a
small symmetry-breaking perturbation, keep k (same active compute), continue pre-training. Utility-based
selection: score experts by gradient-based importance and give high-utility experts more copies.

What this implements, and the choices we made:

- Copies: every expert keeps one copy at its old index (0..E-1); the (m-1)E new slots (E..mE-1) are
  shared out uniformly (m copies each) or, with ``utility_E``, in proportion to the utility by largest
  remainder (every expert keeps at least its original).
- Utility (:func:`expert_utility`): the first-order Taylor importance |sum theta * dL/dtheta| of each
  expert's parameters (Molchanov et al. 2019), summed over calibration batches; our reading of the
  paper's "gradient-based importance".
- Router: new rows = the parent's row + N(0, (perturb * std(row))^2). Shared experts are kept.
- ``mode="copy"`` (the paper): every copy is routable at once. With k fixed this is *not* exactly
  function-preserving: a token whose best expert was duplicated may spend two of its k slots on copies
  of it. ``mode="phased"`` (our addition, exact at step 0): the new copies start with an aux-loss-free
  selection bias of -1 (DeepSeek-V3's bias, added to the probabilities only when selecting), so top-k
  still picks only originals and the renormalised weights are the old ones; the bias update
  (``bias_update_rate``, default 0.01 per step) then raises under-loaded copies into use. It needs
  ``softmax_topk`` with ``softmax_then_topk`` and renormalisation (k > 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.moe import MoELayer
from moelab.models.moe_protocol import replace_moe_layer, require_moe
from moelab.ops.upcycle.common import check_preserving_router, router_matrix
from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS

GROW_MODES = ("copy", "phased")


@dataclass(kw_only=True)
class GrowConfig:
    factor: int = 2  # m: E -> m * E experts per MoE layer
    num_experts: int | None = None  # alternatively the target count (a multiple of E is not required)
    mode: str = "copy"
    perturb: float = 0.01
    utility: bool = False  # utility-based duplication (needs calibration batches)
    bias_update_rate: float = 0.01  # phased mode
    seed: int = 0

    def validate(self) -> None:
        check_range("factor", self.factor, low=1)
        check_choice("mode", self.mode, GROW_MODES)
        check_range("perturb", self.perturb, low=0.0)
        check_range("bias_update_rate", self.bias_update_rate, low=0.0)


def allocate_copies(utility_E: Tensor | None, E: int, target: int) -> list[int]:
    """Parent expert of each of the ``target`` slots: 0..E-1 first, then the extra copies."""
    extra = target - E
    if utility_E is None:
        counts = [extra // E + (1 if e < extra % E else 0) for e in range(E)]
    else:
        u = utility_E.double().clamp_min(0)
        u = u / u.sum() if float(u.sum()) > 0 else torch.full((E,), 1.0 / E, dtype=torch.float64)
        share = u * extra
        counts = share.floor().long().tolist()
        order = torch.argsort(share - share.floor(), descending=True).tolist()
        for e in order[: extra - sum(counts)]:
            counts[e] += 1
    parents = list(range(E))
    for e, c in enumerate(counts):
        parents += [e] * c
    return parents


def grow_layer(layer: MoELayer, cfg: GrowConfig, target: int, utility_E: Tensor | None,
               generator: torch.Generator) -> MoELayer:
    """A new MoE layer with ``target`` experts copied from ``layer`` (see the module docstring)."""
    from moelab.models.moe_protocol import rebuild_layer

    E, D = layer.cfg.num_experts, layer.cfg.d_model
    if target < E:
        raise MoelabError(f"num_experts={target} is smaller than the source's {E}; grow only adds experts")
    check_range("k", layer.cfg.k, low=1, high=target)
    changes = {"num_experts": target}
    if cfg.mode == "phased":
        check_preserving_router(layer.cfg, "grow mode='phased'")
        if layer.cfg.k < 2 or layer.cfg.router_kwargs.get("score_order", "softmax_then_topk") != "softmax_then_topk":
            raise MoelabError("grow mode='phased' needs softmax_topk with score_order='softmax_then_topk' and k > 1")
        changes.update(aux_free_bias=True, bias_update_rate=cfg.bias_update_rate)
    new = rebuild_layer(layer, **changes)
    parents_S = torch.tensor(allocate_copies(utility_E, E, target))
    with torch.no_grad():
        for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            src = getattr(layer.experts, name)
            if src is not None:
                getattr(new.experts, name).copy_(src[parents_S])
        old_ED, new_ED = router_matrix(layer.router, E, D), router_matrix(new.router, target, D)
        rows_SD = old_ED.detach()[parents_S].clone()
        noise_SD = torch.randn(rows_SD.shape, generator=generator).to(rows_SD)
        rows_SD[E:] += cfg.perturb * old_ED.detach().std(dim=1, keepdim=True)[parents_S[E:]] * noise_SD[E:]
        new_ED.copy_(rows_SD)
        if layer.shared_experts is not None:
            new.shared_experts.load_state_dict(layer.shared_experts.state_dict())
        _copy_bias(layer, new, parents_S, cfg.mode == "phased")
    return new


def _copy_bias(layer: MoELayer, new: MoELayer, parents_S: Tensor, phased: bool) -> None:
    old_aux, new_aux = getattr(layer.router, "aux_free", None), getattr(new.router, "aux_free", None)
    if new_aux is None:
        return
    bias_S = old_aux.bias_E[parents_S].clone() if old_aux is not None else torch.zeros(len(parents_S))
    if phased:
        bias_S[layer.cfg.num_experts:] -= 1.0
    new_aux.bias_E.copy_(bias_S.to(new_aux.bias_E))


def expert_utility(model: nn.Module, batches, loss_fn=None) -> dict[int, Tensor]:
    """Per MoE block, the Taylor importance ``|sum(theta * grad)|`` of each expert, summed over
    ``batches`` (an iterable of ``(input_ids_BL, labels_BL)``); gradients are cleared afterwards."""
    sites = require_moe(model, "expert_utility")
    scores = {s.index: torch.zeros(s.layer.cfg.num_experts, dtype=torch.float64) for s in sites}
    was = model.training
    model.eval()
    for ids_BL, labels_BL in batches:
        model.zero_grad(set_to_none=True)
        model(ids_BL, labels_BL=labels_BL).lm_loss.backward()
        for s in sites:
            for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
                w = getattr(s.layer.experts, name)
                if w is not None and w.grad is not None:
                    scores[s.index] += (w.detach() * w.grad).flatten(1).sum(1).abs().double().cpu()
    model.zero_grad(set_to_none=True)
    model.train(was)
    return scores


@UPCYCLERS.register("grow", description="duplicate experts E -> mE, k fixed, router rows copied + perturbation",
                    paper="Dwivedi et al. 2026 (Expert Upcycling, arXiv 2604.19835)")
def grow_experts(model: nn.Module, cfg: GrowConfig, *, utility: dict[int, Tensor] | None = None, **_: object) -> nn.Module:
    """Grow every MoE layer of ``model`` in place; ``utility`` (block -> [E]) from :func:`expert_utility`."""
    cfg.validate()
    sites = require_moe(model, "method='grow'")
    if cfg.utility and utility is None:
        raise MoelabError("utility=True needs utility scores (expert_utility(model, batches))")
    gen = torch.Generator().manual_seed(cfg.seed)
    for s in sites:
        E = s.layer.cfg.num_experts
        target = cfg.num_experts if cfg.num_experts is not None else cfg.factor * E
        u = utility.get(s.index) if (cfg.utility and utility) else None
        replace_moe_layer(model, s.index, grow_layer(s.layer, cfg, target, u, gen))
    return model


UPCYCLE_CONFIGS["grow"] = GrowConfig

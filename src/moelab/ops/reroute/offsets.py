"""Router-logit offsets: the one knob every test-time method of :mod:`moelab.ops.reroute` turns.

``delta_E`` per MoE layer is added to the router's gate logits (a forward hook on ``router.gate``),
so the router's own selection rule (top-k, renormalisation, selection bias) runs on shifted logits
and nothing else in the model changes: experts, attention and embeddings are untouched. This is
exactly the intervention of "Rewiring Experts on the Fly" (additive vectors on router logits) and of
routing steering (a logit bias toward chosen experts); the reference-based methods (R2-T2, C3PO)
express their moved routing weights through it as well.

Routers whose logits do not come from a ``gate`` module (hash, random, SMEAR's merge, ...) are
refused with the list of routers that have one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models.moe_protocol import MoESite, require_moe


def gated_sites(model: nn.Module, layers: list[int] | None, what: str) -> list[MoESite]:
    """The MoE blocks ``layers`` (None: all) of ``model``, each with a gate-logit router."""
    sites = require_moe(model, what)
    by_index = {s.index: s for s in sites}
    if layers is not None:
        bad = [i for i in layers if i not in by_index]
        if bad:
            raise MoelabError(f"layers={bad} are not MoE blocks of this model; MoE blocks: {sorted(by_index)}")
        sites = [by_index[i] for i in layers]
    for s in sites:
        if not isinstance(getattr(s.layer.router, "gate", None), nn.Module):
            raise MoelabError(f"{what}: the router of layer {s.index} ({type(s.layer.router).__name__}) has no gate "
                              "logits to shift; it applies to routers with a `gate` (softmax_topk, sigmoid_topk, "
                              "noisy_topk, top_p, relu, erc, null_experts, norm, ...)")
    return sites


@contextlib.contextmanager
def logit_offsets(sites: list[MoESite], deltas: dict[int, Tensor]) -> Iterator[None]:
    """While open, layer ``i``'s gate logits get ``deltas[i]`` (shape [E]) added; layers without a
    delta are unchanged. Deltas may require grad (the methods optimise them)."""
    handles = []
    for s in sites:
        d = deltas.get(s.index)
        if d is None:
            continue
        E = s.layer.cfg.num_experts
        if tuple(d.shape) != (E,):
            raise MoelabError(f"offset of layer {s.index} has shape {tuple(d.shape)}; expected ({E},)")

        def hook(_m, _args, out, d=d):
            return out + d.to(out.dtype)

        handles.append(s.layer.router.gate.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def zero_offsets(sites: list[MoESite], requires_grad: bool = False) -> dict[int, Tensor]:
    return {s.index: torch.zeros(s.layer.cfg.num_experts, requires_grad=requires_grad) for s in sites}

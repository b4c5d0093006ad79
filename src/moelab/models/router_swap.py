"""Router swap: replace the routers of a trained or imported model by any registered router.

Router-Tuning style (He et al. 2024, "Router-Tuning: A Simple and Effective Approach for Enabling
Dynamic-Depth in Transformers", seed catalog #52: freeze the model, fine-tune only the routers):
keep the experts, attention and embeddings frozen and train only the new routers. Works through the MoE-layer protocol, so it
applies to moelab's transformer and to imported HF models alike.

``swap_routers(model, "cosine", router_kwargs=..., init_from_old=True, freeze_experts=True)``:

- every MoE layer's ``cfg`` becomes ``replace(cfg, router=name, router_kwargs=...)`` and its router
  ``build_router(new cfg)`` (on the old router's device and dtype); ``aux_free_bias`` is kept when
  the new router supports it, else turned off;
- ``init_from_old``: the old router's (E, D) direction matrix (its gate weight) is copied into every
  (E, D) parameter of the new router (its gate, or centroids living in the hidden space); routers
  without such a parameter keep their fresh init (reported as not copied);
- ``freeze_experts``: every parameter outside the routers gets ``requires_grad=False``.

Returns ``{block index: True if weights were copied}``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.moe_protocol import replace_router, require_moe


def _direction(router: nn.Module, E: int, D: int) -> torch.Tensor | None:
    mats = [p for _, p in router.named_parameters() if tuple(p.shape) == (E, D) and "noise" not in _]
    return mats[0].detach() if len(mats) == 1 else None


def _build(cfg: Any) -> nn.Module:
    from moelab.layers.routers import ROUTERS, build_router

    cls = ROUTERS.get(cfg.router) if cfg.router in ROUTERS.names() else None
    if cls is not None and cfg.aux_free_bias and not cls.supports_aux_free:
        cfg = replace(cfg, aux_free_bias=False)
    return build_router(cfg), cfg


def swap_routers(model: nn.Module, router: str, *, router_kwargs: dict[str, Any] | None = None,
                 init_from_old: bool = True, freeze_experts: bool = True) -> dict[int, bool]:
    """See the module docstring."""
    if not isinstance(router, str):
        raise MoelabError(f"router={router!r} must be a registered router name")
    copied: dict[int, bool] = {}
    for site in require_moe(model, "swap_routers"):
        layer = site.layer
        cfg = replace(layer.cfg, router=router, router_kwargs=dict(router_kwargs or {}))
        new, cfg = _build(cfg)
        old_p = next(layer.router.parameters(), None)
        if old_p is not None:
            new.to(device=old_p.device, dtype=old_p.dtype)
        done = False
        old_w = _direction(layer.router, cfg.num_experts, cfg.d_model) if init_from_old else None
        if old_w is not None:
            with torch.no_grad():
                for _, p in new.named_parameters():
                    if tuple(p.shape) == tuple(old_w.shape):
                        p.copy_(old_w.to(p.dtype))
                        done = True
        replace_router(layer, new)
        layer.cfg = cfg
        copied[site.index] = done
    if freeze_experts:
        freeze_all_but_routers(model)
    return copied


def freeze_all_but_routers(model: nn.Module) -> int:
    """``requires_grad=False`` for every parameter outside the MoE routers; returns the trainable count."""
    keep = {id(p) for s in require_moe(model, "training only the routers") for p in s.layer.router.parameters()}
    n = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        n += p.numel() if id(p) in keep else 0
    return n

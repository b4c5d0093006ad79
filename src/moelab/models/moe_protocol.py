"""The MoE-layer protocol: what operations on a trained model (prune, merge, skip, upcycle, LoRA,
re-route, Hugging Face import/export) may rely on, for moelab's own transformer *and* any other
``nn.Module`` that holds :class:`moelab.layers.moe.MoELayer` blocks (an imported HF model).

Write operations against these functions, never against ``MoETransformer``'s attributes:

- :func:`moe_layers(model)` -> list of :class:`MoESite` (block index, the layer, where it sits),
  in depth order. Uses ``model.moe_layers()`` when the model has it, else scans the module tree
  for ``MoELayer`` instances (index: the layer's ``layer_index`` attribute, else its order).
- :func:`replace_moe_layer(model, index, new_layer)` swaps one MoE block's layer in place.
- :func:`replace_router(layer, router)` / :func:`replace_experts(layer, experts)` swap the parts
  of one layer, checking the expert count agrees (change both with a new ``MoELayer`` when the
  expert count changes; see :func:`rebuild_layer`).
- :func:`calibration_hooks(model, fn)`: a context manager calling ``fn(site, x_TD, y_TD)`` after
  every MoE layer's forward (``layer.last_routing`` then holds that forward's routing).

Example (runs as is)::

    import torch
    from moelab.models.config import ModelConfig
    from moelab.models.transformer import MoETransformer
    from moelab.models.moe_protocol import moe_layers, calibration_hooks

    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff_dense=64))
    counts = {}
    with calibration_hooks(model, lambda s, x, y: counts.setdefault(s.index, s.layer.last_stats["counts"])):
        model(torch.randint(0, 64, (2, 8)))
    print([s.index for s in moe_layers(model)], counts)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from torch import Tensor, nn

from moelab.errors import MoelabError


@dataclass
class MoESite:
    """One MoE block of a model: its block ``index``, the ``layer`` (a ``MoELayer``), and where it
    is held (``parent.<attr>``) so it can be replaced."""

    index: int
    layer: nn.Module
    parent: nn.Module
    attr: str


def _is_moe_layer(m: nn.Module) -> bool:
    from moelab.layers.moe import MoELayer

    return isinstance(m, MoELayer)


def _locate(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for attr, child in parent.named_children():
            if child is target:
                return parent, attr
    raise MoelabError("MoE layer is not a submodule of the model")


def moe_layers(model: nn.Module) -> list[MoESite]:
    """Every MoE block of ``model`` in depth order (see the module docstring)."""
    if hasattr(model, "moe_layers") and callable(model.moe_layers):
        pairs = list(model.moe_layers())
    else:
        found = [m for m in model.modules() if _is_moe_layer(m)]
        pairs = [(int(getattr(m, "layer_index", i)), m) for i, m in enumerate(found)]
    sites = []
    for index, layer in pairs:
        parent, attr = _locate(model, layer)
        sites.append(MoESite(index=index, layer=layer, parent=parent, attr=attr))
    return sites


def require_moe(model: nn.Module, what: str) -> list[MoESite]:
    """``moe_layers(model)``, raising a clear error naming ``what`` when there are none."""
    sites = moe_layers(model)
    if not sites:
        raise MoelabError(f"{what} needs a model with MoE layers; this model has none (a dense model)")
    return sites


def get_site(model: nn.Module, index: int) -> MoESite:
    sites = moe_layers(model)
    for s in sites:
        if s.index == index:
            return s
    raise MoelabError(f"layer={index} is not an MoE block; MoE blocks: {[s.index for s in sites]}")


def replace_moe_layer(model: nn.Module, index: int, new_layer: nn.Module) -> nn.Module:
    """Put ``new_layer`` where MoE block ``index``'s layer is; returns the old layer."""
    site = get_site(model, index)
    if hasattr(site.layer, "layer_index"):
        new_layer.layer_index = site.layer.layer_index
    setattr(site.parent, site.attr, new_layer)
    return site.layer


def _num_experts(module: nn.Module) -> int | None:
    return getattr(module, "num_experts", None) or getattr(getattr(module, "cfg", None), "num_experts", None)


def replace_router(layer: nn.Module, router: nn.Module) -> nn.Module:
    """Swap ``layer.router`` (same expert count); returns the old router."""
    old, n = layer.router, _num_experts(router)
    if n is not None and n != layer.cfg.num_experts:
        raise MoelabError(f"router has num_experts={n}; the layer has {layer.cfg.num_experts}")
    layer.router = router
    return old


def replace_experts(layer: nn.Module, experts: nn.Module) -> nn.Module:
    """Swap ``layer.experts`` (same expert count and d_model); returns the old bank."""
    old = layer.experts
    if experts.num_experts != layer.cfg.num_experts or experts.d_model != layer.cfg.d_model:
        raise MoelabError(
            f"experts has num_experts={experts.num_experts}, d_model={experts.d_model}; the layer has "
            f"num_experts={layer.cfg.num_experts}, d_model={layer.cfg.d_model}"
        )
    layer.experts = experts
    return old


def rebuild_layer(layer: nn.Module, **cfg_changes) -> nn.Module:
    """A fresh ``MoELayer`` with ``layer.cfg`` changed by ``cfg_changes`` (e.g. ``num_experts=6``),
    on the old layer's device and dtype; the caller copies weights in."""
    from moelab.layers.moe import MoELayer

    new = MoELayer(replace(layer.cfg, **cfg_changes))
    p = next(layer.parameters(), None)
    if p is not None:
        new.to(device=p.device, dtype=p.dtype)
    new.aux_loss_scale = layer.aux_loss_scale
    return new


@contextlib.contextmanager
def calibration_hooks(model: nn.Module, fn: Callable[[MoESite, Tensor, Tensor], None]) -> Iterator[list[MoESite]]:
    """Call ``fn(site, x_TD, y_TD)`` after every MoE layer's forward while the context is open."""
    sites = moe_layers(model)
    handles = []
    for site in sites:
        def hook(_m, args, out, site=site):
            x = args[0]
            fn(site, x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]))
        handles.append(site.layer.register_forward_hook(hook))
    try:
        yield sites
    finally:
        for h in handles:
            h.remove()

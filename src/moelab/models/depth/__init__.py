"""Depth routing inside the model: per-input / per-token decisions to skip, run or repeat parts of a block.

``ModelConfig.depth = {"method": M, **options}`` makes ``MoETransformer`` put a router of ``DEPTH_ROUTERS[M]``
in every block's ``depth`` slot (``install_depth``); the routers' weights are part of the checkpoint, so a
depth-routed run loads with ``load_run`` like any other. Methods (one file each; papers in their docstrings):

- ``drllm``: Dr.LLM (Heakl et al. 2025) skip / execute / repeat per sequence (``drllm.DrLLMRouter``);
- ``router_tuning``: MindSkip of Router-Tuning (He et al. 2024), attention skip per sequence or token
  (``mindskip.MindSkipRouter``);
- ``duo``: Duo-LLM (Alizadeh et al. 2024) per token skip / small FFN / big FFN (``duo.DuoRouter``).

``route_prefix(model, n)`` (what per-sequence routers may read), ``forcing(model, {block: decision})``
(search, oracles, tests) and ``depth_routers(model)`` are the handles the operations use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from moelab.errors import MoelabError

METHODS = ("drllm", "router_tuning", "duo")


def _build(method: str, cfg, block, opts: dict[str, Any]) -> nn.Module:
    from moelab.models.depth.drllm import DrLLMRouter
    from moelab.models.depth.duo import DuoRouter
    from moelab.models.depth.mindskip import MindSkipRouter

    i, D = block.layer_index, cfg.d_model
    if method == "drllm":
        return DrLLMRouter(D, i, cfg.n_layers + i, hidden=int(opts.get("hidden", 128)), windows=int(opts.get("windows", 8)))
    if method == "router_tuning":
        return MindSkipRouter(D, i, granularity=opts.get("granularity", "sequence"), threshold=opts.get("threshold", 0.5))
    return DuoRouter(D, i, small_ff=int(opts["small_ff"]), small_cost=float(opts["small_cost"]))


def check_applies(model: nn.Module, method: str) -> None:
    """MoelabError unless ``method`` can route ``model``'s depth (a moelab transformer, no routers yet)."""
    if method not in METHODS:
        raise MoelabError(f"method={method!r} is not valid; choose one of: {', '.join(METHODS)}")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn_residual") for b in blocks):
        raise MoelabError(f"method={method!r} needs a moelab transformer (blocks with attention and FFN sub-layers); "
                          f"{type(model).__name__} has none (imported Hugging Face models are not supported)")
    if any(b.depth is not None for b in blocks):
        raise MoelabError(f"the model is already depth-routed ({model.cfg.depth.get('method')!r}); start from the "
                          "unmodified run")
    inner = [b.layer_index for b in blocks if not getattr(b.ffn, "block_residual", True)]
    if inner and method in ("drllm", "duo"):
        raise MoelabError(f"method={method!r} does not apply: blocks {inner} have an inner-residual MoE layer "
                          "(Chain-of-Experts residual='inner'), whose FFN cannot be skipped; use router_tuning")


def install_depth(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Put a router of ``spec["method"]`` in every block's ``depth`` slot (in place)."""
    opts = dict(spec)
    method = str(opts.pop("method", ""))
    check_applies(model, method)
    for block in model.blocks:
        block.depth = _build(method, model.cfg, block, opts)
    return model


def depth_routers(model: nn.Module) -> list[nn.Module]:
    return [b.depth for b in getattr(model, "blocks", []) if getattr(b, "depth", None) is not None]


@contextmanager
def route_prefix(model: nn.Module, n: int | None) -> Iterator[None]:
    """Per-sequence routers read only the first ``n`` positions (the prompt) while inside."""
    from moelab._patch import temporarily

    with temporarily(depth_routers(model), "prefix", n):
        yield


@contextmanager
def forcing(model: nn.Module, decisions: dict[int, Any]) -> Iterator[None]:
    """Override block ``i``'s router with ``decisions[i]`` (an int, ``[B]`` or ``[B, L]`` tensor) while inside."""
    by_index = {r.layer_index: r for r in depth_routers(model)}
    bad = sorted(set(decisions) - set(by_index))
    if bad:
        raise MoelabError(f"blocks {bad} have no depth router; blocks with one: {sorted(by_index)}")
    before = {i: by_index[i].forced for i in decisions}
    for i, d in decisions.items():
        by_index[i].forced = d
    try:
        yield
    finally:
        for i, b in before.items():
            by_index[i].forced = b


__all__ = ["METHODS", "check_applies", "depth_routers", "forcing", "install_depth", "route_prefix"]

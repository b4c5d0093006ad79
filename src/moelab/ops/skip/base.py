"""Expert skipping at inference: per-layer importance scales, the ``wrapped`` router that skips, and
the frontier search for the threshold that realises a target skip rate.

A method is ``fn(model, windows, **opts) -> {block: scale}`` (its per-layer importance factor alpha_l),
registered in ``SKIP_METHODS``. A slot (token t, expert e) of layer l is skipped when
``alpha_l * p_e(t) < tau`` (:class:`moelab.layers.routers.wrapped.WrappedRouter`); ``tau`` is found by
:func:`frontier_search` so that the realised fraction of skipped slots on the calibration sample is
the target rate. Skipping persists in the config (``router: wrapped`` with ``skip_threshold`` and
``skip_scale``), so a skipped model is an ordinary run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from moelab.errors import check_choice, check_range
from moelab.models.moe_protocol import moe_layers, rebuild_layer, replace_moe_layer, require_moe
from moelab.ops.calibrate import CalibrationWindows
from moelab.registry import Registry

SKIP_METHODS: Registry[Callable[..., dict[int, float]]] = Registry("skipping method")


@dataclass(kw_only=True)
class SkipConfig:
    """``method`` (a ``SKIP_METHODS`` name), target skip ``rate`` in [0, 1) of routed slots,
    ``search_batches`` calibration batches each search step runs, ``batch_size``, ``iters`` of bisection."""

    method: str = "modes"
    rate: float = 0.3
    search_batches: int = 4
    batch_size: int = 8
    iters: int = 14

    def validate(self) -> "SkipConfig":
        check_choice("method", self.method, SKIP_METHODS.names())
        check_range("rate", self.rate, low=0.0, high=1.0, high_inclusive=False)
        check_range("search_batches", self.search_batches, low=1)
        check_range("iters", self.iters, low=1)
        return self


def install_skipping(model: nn.Module, scales: dict[int, float], threshold: float = 0.0) -> None:
    """Put a skipping ``wrapped`` router in every MoE layer (keeping its weights) with ``skip_scale =
    scales[block]``; a layer already wrapped keeps its expert map and gets the skip settings added."""
    for site in require_moe(model, "skipping"):
        cfg = site.layer.cfg
        skip = {"skip_threshold": float(threshold), "skip_scale": float(scales.get(site.index, 1.0))}
        if cfg.router == "wrapped":
            new = rebuild_layer(site.layer, router_kwargs={**cfg.router_kwargs, **skip})
            new.load_state_dict(site.layer.state_dict())
        else:
            new = rebuild_layer(site.layer, router="wrapped",
                                router_kwargs={"base": cfg.router, "base_kwargs": dict(cfg.router_kwargs), **skip})
            sd = {(f"router.base.{k[len('router.'):]}" if k.startswith("router.") else k): v
                  for k, v in site.layer.state_dict().items()}
            new.load_state_dict(sd)
        replace_moe_layer(model, site.index, new)


def set_threshold(model: nn.Module, threshold: float) -> None:
    """Set the skip threshold of every wrapped router (and its config, so it persists)."""
    for site in moe_layers(model):
        site.layer.router.skip_threshold = float(threshold)
        site.layer.cfg.router_kwargs["skip_threshold"] = float(threshold)


@torch.no_grad()
def realised_rate(model: nn.Module, windows: CalibrationWindows, n_batches: int, batch_size: int) -> tuple[float, dict[int, float]]:
    """Fraction of routed slots skipped over the first ``n_batches`` batches, and experts per token per layer."""
    skipped = total = 0
    ept: dict[int, list[float]] = {}
    was = model.training
    model.eval()
    for b in range(n_batches):
        ids = windows.ids_NL[b * batch_size:(b + 1) * batch_size]
        if ids.numel() == 0:
            break
        model(ids)
        for site in moe_layers(model):
            r = site.layer.last_routing
            keep = r.keep_S if r.keep_S is not None else torch.ones_like(r.token_S, dtype=torch.bool)
            skipped, total = skipped + int((~keep).sum()), total + int(keep.numel())
            ept.setdefault(site.index, []).append(int(keep.sum()) / max(r.num_tokens, 1))
    model.train(was)
    return skipped / max(total, 1), {i: sum(v) / len(v) for i, v in ept.items()}


def frontier_search(model: nn.Module, windows: CalibrationWindows, rate: float, cfg: SkipConfig) -> dict[str, Any]:
    """Bisection on tau: the realised skip rate is monotone in the threshold (MoDES's frontier search
    exploits this monotonicity; with one token modality the frontier is this one-dimensional search).
    The rate is measured with skipping active in every layer, so skips in early layers change later
    layers' routing, as at inference. Returns the chosen tau and its realised rate."""
    lo, hi = 0.0, max(float(site.layer.router.skip_scale) for site in moe_layers(model)) * 1.0001
    best = (0.0, 0.0)
    for _ in range(cfg.iters if rate > 0 else 0):
        mid = (lo + hi) / 2
        set_threshold(model, mid)
        got, _ = realised_rate(model, windows, cfg.search_batches, cfg.batch_size)
        if got <= rate:
            lo, best = mid, (mid, got)
        else:
            hi = mid
    set_threshold(model, best[0])
    got, ept = realised_rate(model, windows, cfg.search_batches, cfg.batch_size)
    return {"threshold": best[0], "realised_rate": got, "experts_per_token": ept}


def skip_model(model: nn.Module, windows: CalibrationWindows, cfg: SkipConfig) -> dict[str, Any]:
    """Calibrate the method's scales, install skipping, search the threshold; returns the manifest."""
    cfg.validate()
    scales = SKIP_METHODS.get(cfg.method)(model, windows, batch_size=cfg.batch_size, n_batches=cfg.search_batches)
    install_skipping(model, scales)
    found = frontier_search(model, windows, cfg.rate, cfg)
    return {"op": "skip", "method": cfg.method, "paper": SKIP_METHODS.entry(cfg.method).paper,
            "target_rate": cfg.rate, "scales": {str(k): v for k, v in scales.items()}, **found,
            "experts_per_token": {str(k): v for k, v in found["experts_per_token"].items()}}

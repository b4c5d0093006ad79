"""MoDES (Huang et al. 2025, "MoDES: Accelerating Mixture-of-Experts Multimodal Large Language Models via
Dynamic Expert Skipping"), training-free. Globally-modulated local gating (GMLG): the importance of
expert e for token t in layer l is ``alpha_l * p_e(t)``, the local routing probability modulated by a
global, offline-calibrated importance of the layer; a slot is skipped when it is under the threshold,
and the threshold is set by a frontier search for the target skip rate
(:func:`moelab.ops.skip.base.frontier_search`).

alpha_l (our reading of the calibration): the mean KL divergence between the model's next-token
distribution and the one obtained when layer l's routed experts are all skipped, over the calibration
batches, divided by its mean over layers (so alpha averages 1; layers whose experts matter more are
skipped less). The dual-modality thresholds (text / vision) have no counterpart in a text-only LM: one
threshold is used.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.models.moe_protocol import moe_layers, require_moe
from moelab.ops.skip.base import SKIP_METHODS, install_skipping


@torch.no_grad()
def layer_importance(model: nn.Module, windows, *, batch_size: int = 8, n_batches: int = 4) -> dict[int, float]:
    """``{block: mean KL(p_full || p_without_layer_l's_routed_experts)}`` over the first batches."""
    sites = require_moe(model, "MoDES calibration")
    batches = [windows.ids_NL[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
    batches = [b for b in batches if b.numel()]
    was = model.training
    model.eval()
    ref = [torch.log_softmax(model(b).logits.float(), -1) for b in batches]
    saved = {s.index: s.layer for s in sites}
    install_skipping(model, {})
    kl = {}
    for site in moe_layers(model):
        site.layer.router.skip_threshold = float("inf")
        tot = 0.0
        for b, lp in zip(batches, ref):
            lq = torch.log_softmax(model(b).logits.float(), -1)
            tot += float((lp.exp() * (lp - lq)).sum(-1).mean())
        kl[site.index] = tot / len(batches)
        site.layer.router.skip_threshold = 0.0
    from moelab.models.moe_protocol import replace_moe_layer

    for idx, layer in saved.items():
        replace_moe_layer(model, idx, layer)
    model.train(was)
    return kl


@SKIP_METHODS.register("modes", description="skip when layer importance x router probability < threshold; "
                       "frontier search for the rate", paper="Huang et al. 2025 (MoDES)")
def modes(model: nn.Module, windows, *, batch_size: int = 8, n_batches: int = 4, **_: object) -> dict[int, float]:
    kl = layer_importance(model, windows, batch_size=batch_size, n_batches=n_batches)
    mean = sum(kl.values()) / len(kl)
    return {i: (max(v / mean, 1e-6) if mean > 0 else 1.0) for i, v in kl.items()}

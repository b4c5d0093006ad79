"""Gate-threshold skipping, the plain baseline: skip a routed expert when its router probability is
below one global threshold (every layer's scale is 1; cf. the dynamic-skipping baseline of Lu et al.
2024, "Not All Experts are Equal", which MoDES compares against)."""

from __future__ import annotations

from torch import nn

from moelab.models.moe_protocol import require_moe
from moelab.ops.skip.base import SKIP_METHODS


@SKIP_METHODS.register("threshold", description="skip experts whose router probability is under a global threshold",
                       paper="baseline of Huang et al. 2025 (MoDES); Lu et al. 2024")
def threshold(model: nn.Module, windows, **_: object) -> dict[int, float]:
    return {s.index: 1.0 for s in require_moe(model, "skipping")}

"""Routed frequency: how many tokens chose the expert (the classic usage-count baseline)."""

from __future__ import annotations

import numpy as np

from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import PRUNE_CRITERIA


@PRUNE_CRITERIA.register("frequency", description="routed-token count per expert",
                         paper="baseline in Lu et al. 2024 (Not All Experts are Equal); Lasby et al. 2025 (REAP)")
def frequency(st: LayerStats, **_: object) -> np.ndarray:
    return st.count_E.copy()

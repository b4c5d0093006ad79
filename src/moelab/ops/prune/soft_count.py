"""Soft count: the summed gate (combine weight) of the expert over the tokens routed to it."""

from __future__ import annotations

import numpy as np

from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import PRUNE_CRITERIA


@PRUNE_CRITERIA.register("soft_count", description="summed gate weight per expert over its routed tokens",
                         paper="soft activation frequency baseline of Lasby et al. 2025 (REAP)")
def soft_count(st: LayerStats, **_: object) -> np.ndarray:
    return st.gate_sum_E.copy()

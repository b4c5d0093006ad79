"""EAN, expert activation norm: the summed L2 norm of the expert's output over its routed tokens,
sum_{x in X_e} ||f_e(x)||_2 (Jaiswal et al. 2025, "Finding Fantastic Experts in MoEs"; the EAN
baseline of REAP). Unweighted by the gate, summed (not averaged) over routed tokens."""

from __future__ import annotations

import numpy as np

from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import PRUNE_CRITERIA


@PRUNE_CRITERIA.register("ean", description="summed expert output norm over routed tokens",
                         paper="Jaiswal et al. 2025 (Finding Fantastic Experts in MoEs)")
def ean(st: LayerStats, **_: object) -> np.ndarray:
    return st.ean_sum_E.copy()

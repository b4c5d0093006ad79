"""REAP, router-weighted expert activation pruning (Lasby et al. 2025, "REAP the Experts: Why Pruning
Prevails for One-Shot MoE Compression", CerebrasResearch/reap):

    S_e = (1 / |X_e|) * sum_{x in X_e} g_e(x) * ||f_e(x)||_2

X_e: the calibration tokens whose top-k contains e; g_e(x): the combine weight after top-k (and
the router's renormalisation); f_e(x): the expert's output. A mean over routed tokens, so an expert
used rarely but strongly keeps a high score. Experts never routed score 0 (our choice; the mean is
undefined).
"""

from __future__ import annotations

import numpy as np

from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import PRUNE_CRITERIA


@PRUNE_CRITERIA.register("reap", description="mean of gate x expert output norm over routed tokens",
                         paper="Lasby et al. 2025 (REAP)")
def reap(st: LayerStats, **_: object) -> np.ndarray:
    return np.where(st.count_E > 0, st.reap_sum_E / np.maximum(st.count_E, 1), 0.0)

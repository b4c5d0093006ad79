"""EASY-EP (Dong et al. 2025, "Domain-Specific Pruning of Large Mixture-of-Experts Models with Few-shot
Demonstrations", RUCAIBox/EASYEP): output-aware expert importance with token contribution,

    I_e = sum_t g_e(t) * ||f_e(x_t)||_2 * s_t,   s_t = 1 - cos(h_t, h~_t)

summed over the tokens routed to e. h~_t / h_t: the hidden state before / after the routed experts.
Choice: through the MoE-layer protocol we see the layer's input x_t and output y_t, so h~_t = x_t and
h_t = x_t + y_t (the residual update the layer writes). Calibrate on the target domain's text
(``--calib-split`` / a text file) for the paper's domain-specific pruning.
"""

from __future__ import annotations

import numpy as np

from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import PRUNE_CRITERIA


@PRUNE_CRITERIA.register("easy_ep", description="gate x output norm x token contribution (1 - cos before/after)",
                         paper="Dong et al. 2025 (EASY-EP)")
def easy_ep(st: LayerStats, **_: object) -> np.ndarray:
    return st.easy_sum_E.copy()

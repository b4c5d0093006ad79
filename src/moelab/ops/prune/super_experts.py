"""Super Experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"):
the few experts whose down-projection output has rare but extreme activation outliers (they create
the massive activations between decoder layers and the attention sinks; pruning three breaks
Qwen3-30B-A3B). Profiling: each expert's maximum |down_proj output| over the calibration tokens
routed to it. An expert is super when its maximum exceeds both the 99.5th percentile of all
experts' maxima in the model and a tenth of the model-wide largest (the paper's two-sided rule;
the exact constants are our reading). ``--guard-super-experts`` keeps them under any criterion.
"""

from __future__ import annotations

import numpy as np

from moelab.ops.calibrate import LayerStats


def super_experts(stats: dict[int, LayerStats], *, quantile: float = 99.5, frac_of_max: float = 0.1) -> dict[int, set[int]]:
    """``{block: {expert, ...}}`` of super experts (blocks without any are omitted)."""
    all_max = np.concatenate([st.max_act_E for st in stats.values()]) if stats else np.zeros(0)
    if all_max.size == 0 or all_max.max() <= 0:
        return {}
    thr = max(float(np.percentile(all_max, quantile)), frac_of_max * float(all_max.max()))
    out = {b: {int(e) for e in np.nonzero(st.max_act_E >= thr)[0]} for b, st in stats.items()}
    return {b: es for b, es in out.items() if es}

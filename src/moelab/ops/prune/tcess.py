"""PreMoe's TCESS, task-conditioned expected selection score (Pei et al. 2025, "PreMoe: Lightening MoEs
on Constrained Memory by Expert Pruning and Retrieval", JarvisPei/PreMoe):

    TCESS_e(task) = (1 / |T_task|) * sum_{t in T_task} p_e(t) * 1[p_e(t) >= r]

p_e(t): the router's probability of e for token t (renormalised over all experts), r a confidence
threshold (``calibration.tcess_threshold``; our default 1/E: selections above uniform). Pruning keeps
each layer's highest-TCESS experts for the task (probabilistic expert pruning). The task is one domain
of the calibration sample (``task=``); without one, all calibration tokens form the task.
"""

from __future__ import annotations

import numpy as np

from moelab.errors import MoelabError
from moelab.ops.calibrate import LayerStats
from moelab.ops.prune.base import PRUNE_CRITERIA


@PRUNE_CRITERIA.register("tcess", description="PreMoe task-conditioned expected selection score",
                         paper="Pei et al. 2025 (PreMoe)")
def tcess(st: LayerStats, *, task: int | None = None, **_: object) -> np.ndarray:
    if st.tokens_G is None or st.tokens_G.sum() == 0:
        raise MoelabError("criterion 'tcess' needs router probabilities; this router gives none")
    if task is None:
        return st.tcess_sum_GE.sum(0) / st.tokens_G.sum()
    if st.tokens_G[task] == 0:
        raise MoelabError(f"task domain index {task} has no calibration tokens")
    return st.tcess_sum_GE[task] / st.tokens_G[task]

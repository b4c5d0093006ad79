"""Linear (ridge) predictive router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import _ridge


@MODEL_ROUTERS.register("linear", description="per-model ridge regression of the score on features",
                        paper="RouterBench (arXiv:2403.12031): predictive routers")
class LinearRouter(ModelRouter):
    """Per-model ridge regression predicts the score from the prompt features (RouterBench's
    predictive router family); cost = the model's mean training cost, as in RouterBench."""

    name = "linear"
    cv_grid = {"alpha": [0.1, 1.0, 10.0, 100.0]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        alpha: float = 1.0

    def _fit(self, train, x_ND):
        self.w_DM, self.b_M = _ridge(x_ND, train.scores_PM, self.cfg.alpha)

    def _estimate(self, x_PD, batch):
        q = np.clip(x_PD @ self.w_DM + self.b_M, 0.0, 1.0).astype(np.float64)
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {}, {"lin.w_DM": self.w_DM, "lin.b_M": self.b_M}

    def _load_state(self, meta, t):
        self.w_DM, self.b_M = t["lin.w_DM"], t["lin.b_M"]

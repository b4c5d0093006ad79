"""CARROT router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import _ridge


@MODEL_ROUTERS.register("carrot", description="per-model quality and cost regressors; argmax (1-mu)q - mu c",
                        paper="CARROT (Somerstep et al., 2025, arXiv:2502.03261)")
class CarrotRouter(ModelRouter):
    """CARROT: estimate each model's quality p_m(x) and cost c_m(x) with simple regressors on the
    prompt embedding, then pick argmax (1 - mu) p_m(x) - mu c_m(x). Choices: ridge regression for
    both (the paper's linear variant), cost regressed in log-USD (costs are positive and span
    orders of magnitude) and mapped back with exp."""

    name = "carrot"
    cv_grid = {"alpha": [0.1, 1.0, 10.0, 100.0]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        alpha: float = 1.0

    def _fit(self, train, x_ND):
        self.wq_DM, self.bq_M = _ridge(x_ND, train.scores_PM, self.cfg.alpha)
        self.wc_DM, self.bc_M = _ridge(x_ND, np.log(train.costs_PM + 1e-12), self.cfg.alpha)

    def _estimate(self, x_PD, batch):
        q = np.clip(x_PD @ self.wq_DM + self.bq_M, 0.0, 1.0).astype(np.float64)
        c = np.exp(x_PD @ self.wc_DM + self.bc_M).astype(np.float64)
        return q, c

    def _state(self):
        return {}, {"carrot.wq": self.wq_DM, "carrot.bq": self.bq_M, "carrot.wc": self.wc_DM, "carrot.bc": self.bc_M}

    def _load_state(self, meta, t):
        self.wq_DM, self.bq_M, self.wc_DM, self.bc_M = t["carrot.wq"], t["carrot.bq"], t["carrot.wc"], t["carrot.bc"]

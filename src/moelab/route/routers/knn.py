"""kNN router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.errors import check_range
from moelab.route.base import MODEL_ROUTERS, ModelRouter


@MODEL_ROUTERS.register("knn", description="k nearest training prompts: mean score and cost per model",
                        paper="RouterBench (arXiv:2403.12031) kNN router; 'Rethinking Predictive Modeling for LLM "
                              "Routing: When Simple kNN Beats Complex Learned Routers' (2025)")
class KNNRouter(ModelRouter):
    """Cosine kNN over prompt features: quality and cost of model m = mean over the k nearest
    training prompts (RouterBench's predictive kNN router; the kNN-baseline paper's rule), then the
    trade-off argmax. Features are L2-normalised, so cosine = dot product."""

    name = "knn"
    cv_grid = {"k": [5, 10, 20, 50, 100, 200]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        k: int = 20

    def _fit(self, train, x_ND):
        check_range("k", self.cfg.k, low=1)
        n = x_ND / (np.linalg.norm(x_ND, axis=1, keepdims=True) + 1e-8)
        self.x_ND = n.astype(np.float32)
        self.s_NM = train.scores_PM.astype(np.float32)
        self.c_NM = train.costs_PM.astype(np.float32)

    def _estimate(self, x_PD, batch):
        x = x_PD / (np.linalg.norm(x_PD, axis=1, keepdims=True) + 1e-8)
        sim_PN = x @ self.x_ND.T
        k = min(self.cfg.k, sim_PN.shape[1])
        nn_PK = np.argpartition(-sim_PN, k - 1, axis=1)[:, :k]
        return self.s_NM[nn_PK].mean(1).astype(np.float64), self.c_NM[nn_PK].mean(1).astype(np.float64)

    def _state(self):
        return {}, {"knn.x_ND": self.x_ND, "knn.s_NM": self.s_NM, "knn.c_NM": self.c_NM}

    def _load_state(self, meta, t):
        self.x_ND, self.s_NM, self.c_NM = t["knn.x_ND"], t["knn.s_NM"], t["knn.c_NM"]

"""Single-model baselines: best-single and cheapest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter


@MODEL_ROUTERS.register("best-single", description="always the model with the best mean training score",
                        paper="RouterBench (arXiv:2403.12031): single-model baselines")
class BestSingleRouter(ModelRouter):
    name = "best-single"
    needs_features = False

    def _estimate(self, x_PD, batch):
        P = self._n(x_PD, batch)
        return np.broadcast_to(self.mean_q_M, (P, len(self.models))).copy(), self._mean_costs(P)

    def decide_grid(self, q_PM, c_PM, mus):
        best = int(np.argmax(self.mean_q_M - 1e-12 * self.mean_cost_M))
        return np.full((len(mus), len(q_PM)), best)


@MODEL_ROUTERS.register("cheapest", description="always the model with the lowest mean training cost",
                        paper="RouterBench (arXiv:2403.12031): single-model baselines")
class CheapestRouter(BestSingleRouter):
    name = "cheapest"

    def decide_grid(self, q_PM, c_PM, mus):
        return np.full((len(mus), len(q_PM)), int(np.argmin(self.mean_cost_M)))

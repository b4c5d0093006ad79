"""Random router (RouteLLM's baseline, extended to M models)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.data import RoutingDataset, prompt_hash


@MODEL_ROUTERS.register("random", description="random mix of the cheapest and the best single model",
                        paper="RouteLLM (Ong et al., 2024, arXiv:2406.18665): random router baseline")
class RandomRouter(ModelRouter):
    """Sends each prompt to the best single (training) model with probability ``1 - mu``, else to
    the cheapest; RouteLLM's random router for two models, extended to M models this way. The same
    uniform draws are reused across ``mu`` so the sweep traces the chord between the two models."""

    name = "random"
    needs_features = False

    @dataclass
    class Config:
        seed: int = 0

    def _estimate(self, x_PD, batch):
        P = self._n(x_PD, batch)
        ids = batch.prompt_ids if isinstance(batch, RoutingDataset) else [str(t) for t in batch]
        u_P = np.array([prompt_hash(f"{self.cfg.seed}:{i}") for i in ids]) if ids else np.zeros(P)
        q_PM = np.zeros((P, len(self.models)))
        q_PM[:, 0] = u_P  # carries the draws to decide_grid
        return q_PM, self._mean_costs(P)

    def decide_grid(self, q_PM, c_PM, mus):
        best, cheap = int(np.argmax(self.mean_q_M)), int(np.argmin(self.mean_cost_M))
        return np.stack([np.where(q_PM[:, 0] < 1.0 - m, best, cheap) for m in mus])

"""Oracle router (an evaluation bound)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter


@MODEL_ROUTERS.register("oracle", description="cheapest model with the best true score (upper bound)",
                        paper="RouterBench (Hu et al., 2024, arXiv:2403.12031): oracle_model_to_route_to")
class OracleRouter(ModelRouter):
    """Reads the true scores and costs of the batch: at ``mu = 0`` the cheapest model that scores
    best, and the best true trade-off at other ``mu``. An evaluation bound, not a deployable router."""

    name = "oracle"
    needs_features = False
    uses_truth = True

    def _estimate(self, x_PD, batch):
        return batch.scores_PM, batch.costs_PM

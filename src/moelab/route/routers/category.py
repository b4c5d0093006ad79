"""Category-table router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.data import RoutingDataset


@MODEL_ROUTERS.register("category", description="category -> model table (given or predicted category)",
                        paper="Composition of Experts: A Modular Compound AI System Leveraging LLMs (SambaNova, 2024); "
                              "Arch-Router (arXiv:2506.16655)")
class CategoryRouter(ModelRouter):
    """Two-step routing: a prompt's category (given by the batch, Arch-Router's policy label, or
    predicted by a nearest-centroid classifier on the features, CoE's category router) indexes a
    table of per-category mean score and cost per model; the trade-off rule picks the model.
    Categories unseen in training fall back to the global means."""

    name = "category"
    cv_grid = {"min_count": [1, 10, 50]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        use_given_categories: bool = True
        min_count: int = 1

    def _fit(self, train, x_ND):
        cats = sorted(set(train.categories))
        self.cats = cats
        ci = np.array([cats.index(c) for c in train.categories])
        self.q_CM = np.stack([train.scores_PM[ci == k].mean(0) for k in range(len(cats))])
        self.c_CM = np.stack([train.costs_PM[ci == k].mean(0) for k in range(len(cats))])
        cnt = np.bincount(ci, minlength=len(cats))
        small = cnt < self.cfg.min_count
        self.q_CM[small], self.c_CM[small] = self.mean_q_M, self.mean_cost_M
        cent = np.stack([x_ND[ci == k].mean(0) for k in range(len(cats))])
        self.cent_CD = cent / (np.linalg.norm(cent, axis=1, keepdims=True) + 1e-8)

    def _estimate(self, x_PD, batch):
        if self.cfg.use_given_categories and isinstance(batch, RoutingDataset):
            known = {c: i for i, c in enumerate(self.cats)}
            ci = np.array([known.get(c, -1) for c in batch.categories])
        else:
            ci = np.argmax(x_PD @ self.cent_CD.T, axis=1)
        q = np.where(ci[:, None] >= 0, self.q_CM[np.maximum(ci, 0)], self.mean_q_M)
        c = np.where(ci[:, None] >= 0, self.c_CM[np.maximum(ci, 0)], self.mean_cost_M)
        return q.astype(np.float64), c.astype(np.float64)

    def _state(self):
        return {"cats": self.cats}, {"cat.q_CM": self.q_CM, "cat.c_CM": self.c_CM, "cat.cent_CD": self.cent_CD}

    def _load_state(self, meta, t):
        self.cats = meta["cats"]
        self.q_CM, self.c_CM, self.cent_CD = t["cat.q_CM"], t["cat.c_CM"], t["cat.cent_CD"]

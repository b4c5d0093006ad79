"""UniRoute (universal model routing, cluster-based)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.errors import MoelabError
from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.data import prompt_hash


@MODEL_ROUTERS.register("universal", description="models as per-cluster scores on probe prompts; add unseen models",
                        paper="Universal model routing (Jitkrittum et al., 2025, arXiv:2502.08773): UniRoute, cluster-based")
class UniversalRouter(ModelRouter):
    """UniRoute (cluster-based): k-means clusters of training prompt features; each model is the
    vector Psi_m[k] of its mean score on the probe prompts of cluster k (a small representative
    set, ``n_probe`` training prompts chosen by hash). A prompt's quality estimate for m is
    Psi_m[cluster(x)]. A model unseen in training joins with :meth:`add_model` from its scores and
    costs on the probe prompts, with no retraining. Choice: per-cluster means are shrunk toward the
    model's overall probe mean with ``prior`` pseudo-counts."""

    name = "universal"
    cv_grid = {"n_clusters": [8, 16, 32]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        n_clusters: int = 16
        n_probe: int = 400
        prior: float = 2.0
        seed: int = 0

    def _fit(self, train, x_ND):
        from sklearn.cluster import KMeans

        order = np.argsort([prompt_hash(f"probe{self.cfg.seed}:{p}") for p in train.prompt_ids])
        self.probe_idx = np.sort(order[: min(self.cfg.n_probe, train.n_prompts)])
        self.probe_ids = [train.prompt_ids[i] for i in self.probe_idx]
        self.probe_texts = [train.texts[i] for i in self.probe_idx]
        k = max(1, min(self.cfg.n_clusters, len(x_ND)))
        km = KMeans(k, n_init=2, random_state=self.cfg.seed).fit(x_ND)
        self.cent_KD = km.cluster_centers_.astype(np.float32)
        self.probe_cluster = km.predict(x_ND[self.probe_idx])
        self.psi_MK = np.zeros((0, k), np.float32)
        self.cost_M = np.zeros(0)
        models, self.models = self.models, []
        for j, m in enumerate(models):
            self.add_model(m, train.scores_PM[self.probe_idx, j], train.costs_PM[self.probe_idx, j])

    def add_model(self, name: str, probe_scores: np.ndarray, probe_costs: np.ndarray) -> None:
        """Add a model (seen or unseen) from its scores and USD costs on ``self.probe_ids``."""
        probe_scores = np.asarray(probe_scores, float)
        probe_costs = np.asarray(probe_costs, float)
        n = len(self.probe_cluster)
        for nm, v in (("probe_scores", probe_scores), ("probe_costs", probe_costs)):
            if v.shape != (n,):
                raise MoelabError(f"{nm} has shape {v.shape}; expected ({n},), one value per probe prompt")
        if not np.all(np.isfinite(probe_scores)) or probe_scores.min() < 0 or probe_scores.max() > 1:
            raise MoelabError(f"probe_scores of model {name!r} must be finite and in [0, 1]")
        if name in self.models:
            raise MoelabError(f"model {name!r} is already in the router ({self.models})")
        K = len(self.cent_KD)
        cnt = np.bincount(self.probe_cluster, minlength=K)
        sums = np.bincount(self.probe_cluster, weights=probe_scores, minlength=K)
        psi = (sums + self.cfg.prior * probe_scores.mean()) / (cnt + self.cfg.prior)
        self.psi_MK = np.vstack([self.psi_MK, psi[None].astype(np.float32)])
        self.cost_M = np.append(self.cost_M, probe_costs.mean())
        self.models.append(name)
        self.mean_cost_M = self.cost_M.copy()
        self.mean_q_M = self.psi_MK.mean(1).astype(np.float64)
        if self.fitted or len(self.models) == len(self.psi_MK):
            self.c_scale = float(self.cost_M.max()) or 1.0

    def _check_batch(self, batch):
        pass  # the pool may differ from the training pool

    def _estimate(self, x_PD, batch):
        d = ((x_PD[:, None, :] - self.cent_KD[None]) ** 2).sum(-1)
        k_P = np.argmin(d, axis=1)
        return self.psi_MK[:, k_P].T.astype(np.float64), self._mean_costs(len(x_PD))

    def _state(self):
        return ({"probe_ids": self.probe_ids, "probe_texts": self.probe_texts},
                {"uni.cent_KD": self.cent_KD, "uni.probe_cluster": self.probe_cluster.astype(np.int64),
                 "uni.psi_MK": self.psi_MK, "uni.cost_M": self.cost_M})

    def _load_state(self, meta, t):
        self.probe_ids, self.probe_texts = meta["probe_ids"], meta["probe_texts"]
        self.cent_KD, self.probe_cluster = t["uni.cent_KD"], t["uni.probe_cluster"]
        self.psi_MK, self.cost_M = t["uni.psi_MK"], t["uni.cost_M"]

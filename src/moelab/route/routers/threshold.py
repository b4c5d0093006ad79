"""RouteLLM threshold router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS
from moelab.route.routers._two_model import _TwoModel
from moelab.route.routers.mf import MFRouter


@MODEL_ROUTERS.register("threshold", description="RouteLLM strong/weak threshold on P(strong wins), calibrated",
                        paper="RouteLLM (Ong et al., 2024, arXiv:2406.18665): threshold routing + calibrate_threshold")
class ThresholdRouter(_TwoModel):
    """RouteLLM: route to the strong model when the win probability P(strong beats weak | x) >=
    alpha. The win probability comes from an MF model (RouteLLM's recommended router, trained as in
    :class:`MFRouter`). alpha is calibrated as RouteLLM does: the (1 - f) quantile of the scores on
    calibration prompts sends a fraction f to the strong model (:meth:`calibrate`). In the
    ``mu`` interface, f = 1 - mu with thresholds calibrated on the training prompts."""

    name = "threshold"
    uses_torch = True

    @dataclass
    class Config:
        dim: int = 128
        epochs: int = 40  # 10 underfit RouteLLM MMLU (AIQ 0.753 vs 0.763 for threshold at 40)
        lr: float = 3e-3
        seed: int = 0
        strong_frac: float = 0.5

    def _fit(self, train, x_ND):
        self.strong, self.weak = self._strong_weak()
        self.mf = MFRouter(dim=self.cfg.dim, epochs=self.cfg.epochs, lr=self.cfg.lr, seed=self.cfg.seed)
        self.mf.models = self.models
        self.mf._fit(train, x_ND)
        score = self._p_strong(x_ND)
        self._thresholds(score)
        self.threshold = self.threshold_for(score, self.cfg.strong_frac)

    def _p_strong(self, x_PD) -> np.ndarray:
        return self.mf.win_prob(x_PD)[:, self.strong, self.weak]

    def _estimate(self, x_PD, batch):
        p = self._p_strong(x_PD)
        q = np.zeros((len(x_PD), 2))
        q[:, self.strong] = p  # hardness = p_strong - 0
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        meta, t = super()._state()
        m2, t2 = self.mf._state()
        meta["mf"] = m2
        t.update(t2)
        return meta, t

    def _load_state(self, meta, t):
        super()._load_state(meta, t)
        self.mf = MFRouter(dim=self.cfg.dim, epochs=self.cfg.epochs, lr=self.cfg.lr, seed=self.cfg.seed)
        self.mf.models = self.models
        self.mf._load_state(meta["mf"], t)

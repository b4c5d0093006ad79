"""SafeRoute-style cascade router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS
from moelab.route.routers._two_model import _TwoModel


@MODEL_ROUTERS.register("cascade", description="try the cheap model; escalate when a classifier says 'hard'",
                        paper="SafeRoute (Lee et al., 2025, arXiv:2502.12464)")
class CascadeRouter(_TwoModel):
    """SafeRoute-style cascade: the cheap model always runs; a binary classifier on prompt features
    predicts whether the prompt is "hard" (the cheap model fails where the strong one succeeds:
    label 1[s_strong > s_cheap]); hard prompts are escalated to the strong model, whose cost is paid
    on top of the cheap attempt. Choices: logistic regression on our prompt features (SafeRoute
    uses the small guard model's hidden states); the escalation threshold is calibrated to a target
    escalation fraction 1 - mu on the training prompts."""

    name = "cascade"
    cv_grid = {"C": [0.1, 1.0, 10.0]}  # tuned by CV on the training split (route.tuning)
    cascade = True

    @dataclass
    class Config:
        C: float = 1.0
        strong_frac: float = 0.5

    def _fit(self, train, x_ND):
        from sklearn.linear_model import LogisticRegression

        self.strong = int(np.argmax(self.mean_cost_M))
        self.weak = 1 - self.strong
        y = (train.scores_PM[:, self.strong] > train.scores_PM[:, self.weak]).astype(int)
        if y.min() == y.max():
            self.w_D, self.b = np.zeros(x_ND.shape[1], np.float32), float(np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3)))
        else:
            lr = LogisticRegression(C=self.cfg.C, max_iter=500).fit(x_ND, y)
            self.w_D, self.b = lr.coef_[0].astype(np.float32), float(lr.intercept_[0])
        p = self._p_hard(x_ND)
        self._thresholds(p)
        self.threshold = self.threshold_for(p, self.cfg.strong_frac)

    def _p_hard(self, x_PD):
        return 1.0 / (1.0 + np.exp(-(x_PD @ self.w_D + self.b)))

    def _estimate(self, x_PD, batch):
        q = np.zeros((len(x_PD), 2))
        q[:, self.strong] = self._p_hard(x_PD)
        return q, self._mean_costs(len(x_PD))

    def paid_cost(self, idx_P, c_PM):
        paid = c_PM[np.arange(len(idx_P)), idx_P]
        return paid + np.where(idx_P == self.strong, c_PM[:, self.weak], 0.0)

    def _state(self):
        meta, t = super()._state()
        meta["b"] = self.b
        t["cas.w_D"] = self.w_D
        return meta, t

    def _load_state(self, meta, t):
        super()._load_state(meta, t)
        self.b, self.w_D = meta["b"], t["cas.w_D"]

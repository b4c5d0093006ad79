"""RouteLLM's similarity-weighted (SW) ranking router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter


def battle_counts(scores_NM: np.ndarray) -> np.ndarray:
    """``y_NMM[n, a, b]`` = 1 if a beats b on prompt n, 0.5 for a tie (RouteLLM counts a tie as
    one win for each side of a duplicated battle), 0 on the diagonal."""
    d = scores_NM[:, :, None] - scores_NM[:, None, :]
    y = (d > 0).astype(np.float32) + 0.5 * (d == 0)
    M = scores_NM.shape[1]
    y[:, np.arange(M), np.arange(M)] = 0.0
    return y


def bt_mle(w_PMM: np.ndarray, iters: int = 30) -> np.ndarray:
    """Bradley–Terry strengths ``theta_PM`` (natural-log units, mean 0) maximising
    sum_ab w_ab log sigmoid(theta_a - theta_b), one problem per row, by Newton steps.
    RouteLLM fits the same likelihood with sklearn's LogisticRegression (Elo = 400 / ln 10 * theta)."""
    P, M, _ = w_PMM.shape
    th = np.zeros((P, M))
    n_PMM = w_PMM + w_PMM.transpose(0, 2, 1)  # battles per pair
    diag = np.arange(M)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(th[:, :, None] - th[:, None, :])))  # P(a beats b)
        g_PM = (w_PMM - n_PMM * p).sum(2)
        h = n_PMM * p * (1 - p)
        H = -h  # negative Hessian = graph Laplacian of h (positive semi-definite)
        H[:, diag, diag] = h.sum(2)
        H += 1.0 / M  # pins the free direction (adding a constant to every theta)
        th += np.clip(np.linalg.solve(H, g_PM[:, :, None])[:, :, 0], -2.0, 2.0)
        th -= th.mean(1, keepdims=True)
    return th


@MODEL_ROUTERS.register("sw-ranking", description="similarity-weighted Bradley–Terry (Elo) over similar training prompts",
                        paper="RouteLLM (Ong et al., 2024, arXiv:2406.18665): similarity-weighted ranking router "
                              "(routellm/routers/routers.py SWRankingRouter)")
class SWRankingRouter(ModelRouter):
    """RouteLLM's SW ranking: every training "battle" (a prompt on which two models are compared)
    is weighted by its similarity to the query, w = 10 * 10^(sim / max_sim) with cosine sim, and a
    Bradley–Terry (Elo) MLE with ties is fitted per query; P(a beats b | x) = sigmoid(theta_a -
    theta_b). Quality for the trade-off rule = the mean win probability against the other models
    (for two models: P(strong wins), RouteLLM's routing score); cost = mean training cost.

    Choices: battles come from the score matrix (every model pair on every training prompt: a win
    when its score is higher, a tie when equal) instead of Chatbot Arena votes; the pool's models
    are rated directly, so RouteLLM's grouping of ~60 Arena models into 10 tiers is not needed;
    ``prior`` pseudo-battles (half a win each way per pair) keep the MLE finite when one model
    wins every similar battle (RouteLLM's unpenalised fit has no finite optimum then). The
    per-query fit uses per-pair weighted win counts (sufficient statistics): the same likelihood
    as fitting the weighted battles one by one."""

    name = "sw-ranking"
    cv_grid = {"prior": [0.1, 1.0, 10.0]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        prior: float = 1.0
        iters: int = 30

    def _fit(self, train, x_ND):
        self.x_ND = (x_ND / (np.linalg.norm(x_ND, axis=1, keepdims=True) + 1e-8)).astype(np.float32)
        M = len(self.models)
        self.y_NQ = battle_counts(train.scores_PM).reshape(len(x_ND), M * M)

    def weights(self, x_PD) -> np.ndarray:
        """RouteLLM's ``get_weightings``: 10 * 10^(sim / max_sim) per training prompt, ``w_PN``."""
        x = x_PD / (np.linalg.norm(x_PD, axis=1, keepdims=True) + 1e-8)
        sim_PN = x @ self.x_ND.T
        mx = sim_PN.max(1, keepdims=True)
        return 10.0 * 10.0 ** (sim_PN / np.where(np.abs(mx) > 1e-12, mx, 1.0))

    def win_prob(self, x_PD) -> np.ndarray:
        M = len(self.models)
        w_PMM = (self.weights(x_PD) @ self.y_NQ).reshape(-1, M, M).astype(np.float64)
        w_PMM += 0.5 * self.cfg.prior * (1 - np.eye(M))[None]
        th = bt_mle(w_PMM, self.cfg.iters)
        return 1.0 / (1.0 + np.exp(-(th[:, :, None] - th[:, None, :])))

    def _estimate(self, x_PD, batch):
        M = len(self.models)
        if M == 1:
            return np.full((len(x_PD), 1), 0.5), self._mean_costs(len(x_PD))
        p = np.concatenate([self.win_prob(x_PD[s:s + 512]) for s in range(0, len(x_PD), 512)])  # bounded memory
        return (p.sum(2) - 0.5) / (M - 1), self._mean_costs(len(x_PD))

    def _state(self):
        return {}, {"sw.x_ND": self.x_ND, "sw.y_NQ": self.y_NQ}

    def _load_state(self, meta, t):
        self.x_ND, self.y_NQ = t["sw.x_ND"], t["sw.y_NQ"]

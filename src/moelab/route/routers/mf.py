"""RouteLLM matrix-factorisation router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import F, _pairs, _torch_state, _train, nets, torch


@MODEL_ROUTERS.register("mf", description="RouteLLM matrix factorisation trained on pairwise (BT) wins",
                        paper="RouteLLM (Ong et al., 2024, arXiv:2406.18665): matrix factorization router")
class MFRouter(ModelRouter):
    """RouteLLM's MF router: delta(m, x) = w2^T (v_m ⊙ W1 x); P(a beats b | x) =
    sigmoid(delta_a - delta_b), trained with BCE on Bradley–Terry "battles". Choices: battles are
    built from the score matrix (every model pair whose scores differ on a prompt, weighted by the
    score gap; ties are dropped) instead of Chatbot Arena votes; prompts are embedded with our
    local features instead of OpenAI embeddings. Quality for the trade-off rule = the mean win
    probability against the other models (for two models: P(strong wins), RouteLLM's score)."""

    name = "mf"
    cv_grid = {"weight_decay": [1e-5, 1e-3]}  # tuned by CV on the training split (route.tuning)
    uses_torch = True

    @dataclass
    class Config:
        dim: int = 128
        epochs: int = 40  # 10 underfit RouteLLM MMLU (AIQ 0.753 vs 0.763 for threshold at 40)
        lr: float = 3e-3
        weight_decay: float = 1e-5
        seed: int = 0

    def _fit(self, train, x_ND):
        torch.manual_seed(self.cfg.seed)
        self.net = nets.MF(len(self.models), x_ND.shape[1], self.cfg.dim)
        n, a, b, y, w = (torch.from_numpy(z) for z in _pairs(train.scores_PM))
        x = torch.from_numpy(x_ND)

        def loss(i):
            d = self.net(x[n[i]])
            logit = d.gather(1, a[i, None]).squeeze(1) - d.gather(1, b[i, None]).squeeze(1)
            return (F.binary_cross_entropy_with_logits(logit, y[i], reduction="none") * w[i]).mean()

        if len(n) > 0:  # else every model scores the same on every prompt: nothing to learn
            _train(self.net, loss, len(n), self.cfg.epochs, 256, self.cfg.lr, self.cfg.weight_decay, self.cfg.seed)
        self._set_weights(_torch_state("mf", self.net))

    def _set_weights(self, w: dict) -> None:
        """delta(m, x) = w2^T (normalize(v_m) * W1 x) is linear in x: delta_PM = x_PD @ A_DM with
        A_DM = W1^T (normalize(v) * w2)^T, so routing is one numpy product (no torch)."""
        self._w = {k: np.asarray(v, np.float32) for k, v in w.items()}
        v_MH = self._w["mf.P.weight"]
        v_MH = v_MH / np.maximum(np.linalg.norm(v_MH, axis=1, keepdims=True), 1e-12)  # F.normalize
        self.A_DM = np.ascontiguousarray(self._w["mf.text_proj.weight"].T @ (v_MH * self._w["mf.classifier.weight"]).T)

    def delta(self, x_PD) -> np.ndarray:
        return np.asarray(x_PD, np.float32) @ self.A_DM

    def win_prob(self, x_PD) -> np.ndarray:
        """P(a beats b | x) = sigmoid(delta_a - delta_b), ``p_PMM``."""
        d_PM = self.delta(x_PD).astype(np.float64)
        return 1.0 / (1.0 + np.exp(-(d_PM[:, :, None] - d_PM[:, None, :])))

    def _estimate(self, x_PD, batch):
        M = len(self.models)
        p = self.win_prob(x_PD)
        q = (p.sum(2) - 0.5) / max(M - 1, 1) if M > 1 else np.full((len(x_PD), 1), 0.5)
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {"d_in": int(self.A_DM.shape[0])}, dict(self._w)

    def _load_state(self, meta, t):
        self._set_weights({k: v for k, v in t.items() if k.startswith("mf.")})

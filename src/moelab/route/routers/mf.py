"""RouteLLM matrix-factorisation router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import F, _load_torch, _pairs, _torch_state, _train, nets, torch


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
        if len(n) == 0:
            return  # every model scores the same on every prompt: nothing to learn
        x = torch.from_numpy(x_ND)

        def loss(i):
            d = self.net(x[n[i]])
            logit = d.gather(1, a[i, None]).squeeze(1) - d.gather(1, b[i, None]).squeeze(1)
            return (F.binary_cross_entropy_with_logits(logit, y[i], reduction="none") * w[i]).mean()

        _train(self.net, loss, len(n), self.cfg.epochs, 256, self.cfg.lr, self.cfg.weight_decay, self.cfg.seed)

    def win_prob(self, x_PD) -> np.ndarray:
        with torch.no_grad():
            d_PM = self.net(torch.from_numpy(x_PD))
            p_PMM = torch.sigmoid(d_PM[:, :, None] - d_PM[:, None, :])
        return p_PMM.numpy().astype(np.float64)

    def _estimate(self, x_PD, batch):
        M = len(self.models)
        p = self.win_prob(x_PD)
        q = (p.sum(2) - 0.5) / max(M - 1, 1) if M > 1 else np.full((len(x_PD), 1), 0.5)
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {"d_in": self.net.text_proj.in_features}, _torch_state("mf", self.net)

    def _load_state(self, meta, t):
        self.net = nets.MF(len(self.models), meta["d_in"], self.cfg.dim)
        _load_torch("mf", self.net, t)

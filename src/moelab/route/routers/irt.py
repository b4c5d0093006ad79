"""IRT-style router: prompt difficulty and discrimination x model ability (multidimensional IRT)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import F, _torch_state, _train, torch


def _softplus(z):
    return np.logaddexp(0.0, z)


@MODEL_ROUTERS.register("irt", description="multidimensional IRT: sigmoid(a(x) . theta_m - b(x)) per model",
                        paper="IRT-Router (Song et al., ACL 2025, arXiv:2506.01048): MIRT router")
class IRTRouter(ModelRouter):
    """IRT-Router's MIRT form: the probability that model m answers prompt x correctly is
    sigmoid(a(x) . theta_m - b(x)), with a model ability vector theta_m (K dims, one learned
    embedding per model), and the prompt's discrimination a(x) (K dims, kept positive with
    softplus) and difficulty b(x) predicted from the prompt embedding by linear maps. Trained with
    BCE on the (soft) scores; the trade-off rule uses these probabilities as quality and the
    model's mean training cost.

    Choices: a(x), b(x) are linear in our prompt features (IRT-Router maps a BERT embedding through
    small networks and also embeds the LLMs' descriptions; here theta_m is a free embedding, so no
    model descriptions are needed); AdamW with weight decay ``weight_decay``; the fitted maps are
    exported to numpy, so routing needs no torch."""

    name = "irt"
    uses_torch = True
    cv_grid = {"dim": [4, 16]}  # tuned by CV on the training split (route.tuning)

    @dataclass
    class Config:
        dim: int = 16
        epochs: int = 30
        lr: float = 1e-2
        weight_decay: float = 1e-4
        seed: int = 0

    def _fit(self, train, x_ND):
        torch.manual_seed(self.cfg.seed)
        D, M, K = x_ND.shape[1], len(self.models), self.cfg.dim
        net = torch.nn.ModuleDict({"a": torch.nn.Linear(D, K), "b": torch.nn.Linear(D, 1),
                                   "theta": torch.nn.Embedding(M, K)})
        x = torch.from_numpy(x_ND)
        y = torch.from_numpy(train.scores_PM.astype(np.float32))

        def logits(xb):
            return F.softplus(net["a"](xb)) @ net["theta"].weight.T - net["b"](xb)

        _train(net, lambda i: F.binary_cross_entropy_with_logits(logits(x[i]), y[i]), len(x),
               self.cfg.epochs, 128, self.cfg.lr, self.cfg.weight_decay, self.cfg.seed)
        self._set(_torch_state("irt", net))

    def _set(self, w: dict) -> None:
        self._w = {k: np.asarray(v, np.float32) for k, v in w.items()}
        self.Wa_DK, self.ba_K = self._w["irt.a.weight"].T.copy(), self._w["irt.a.bias"]
        self.wb_D, self.bb = self._w["irt.b.weight"][0], float(self._w["irt.b.bias"][0])
        self.theta_MK = self._w["irt.theta.weight"]

    def ability_difficulty(self, x_PD):
        """(discrimination a_PK, difficulty b_P) of each prompt."""
        return _softplus(x_PD @ self.Wa_DK + self.ba_K), x_PD @ self.wb_D + self.bb

    def _estimate(self, x_PD, batch):
        a_PK, b_P = self.ability_difficulty(np.asarray(x_PD, np.float64))
        q = 1.0 / (1.0 + np.exp(-(a_PK @ self.theta_MK.T - b_P[:, None])))
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {}, dict(self._w)

    def _load_state(self, meta, t):
        self._set({k: v for k, v in t.items() if k.startswith("irt.")})

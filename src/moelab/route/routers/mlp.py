"""MLP predictive router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import F, _load_torch, _torch_state, _train, nets, torch


@MODEL_ROUTERS.register("mlp", description="small MLP predicting every model's score (sigmoid, BCE)",
                        paper="RouterBench (arXiv:2403.12031): predictive MLP router")
class MLPRouter(ModelRouter):
    """One-hidden-layer MLP with M sigmoid outputs trained with BCE on the (soft) scores; cost = the
    model's mean training cost (RouterBench's MLP predictive router)."""

    name = "mlp"
    cv_grid = {"weight_decay": [1e-4, 1e-2]}  # tuned by CV on the training split (route.tuning)
    uses_torch = True

    @dataclass
    class Config:
        hidden: int = 128
        epochs: int = 20
        lr: float = 3e-3
        weight_decay: float = 1e-4
        seed: int = 0

    def _fit(self, train, x_ND):
        torch.manual_seed(self.cfg.seed)
        self.net = nets.MLP(x_ND.shape[1], self.cfg.hidden, len(self.models))
        x = torch.from_numpy(x_ND)
        y = torch.from_numpy(train.scores_PM.astype(np.float32))
        _train(self.net, lambda i: F.binary_cross_entropy_with_logits(self.net(x[i]), y[i]),
               len(x), self.cfg.epochs, 128, self.cfg.lr, self.cfg.weight_decay, self.cfg.seed)

    def _estimate(self, x_PD, batch):
        with torch.no_grad():
            q = torch.sigmoid(self.net(torch.from_numpy(x_PD))).numpy().astype(np.float64)
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {"d_in": self.net.l1.in_features}, _torch_state("mlp", self.net)

    def _load_state(self, meta, t):
        self.net = nets.MLP(meta["d_in"], self.cfg.hidden, len(self.models))
        _load_torch("mlp", self.net, t)

"""RouterDC router."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.routers._common import F, _load_torch, _torch_state, _train, nets, torch


@MODEL_ROUTERS.register("routerdc", description="dual contrastive query encoder + LLM embeddings",
                        paper="RouterDC (Chen et al., NeurIPS 2024, arXiv:2409.19886)")
class RouterDCRouter(ModelRouter):
    """RouterDC: an encoder E and one learnable embedding k_m per LLM, s(x, m) = cos(E(x), k_m).
    Loss 1 (sample–LLM): for each top-``n_pos`` model, InfoNCE against the bottom-``n_neg`` models.
    Loss 2 (sample–sample): prompts in the same k-means cluster of the features are pulled together
    and pushed from other clusters. Choices: E is an MLP over our frozen prompt features (the paper
    fine-tunes mDeBERTa); prompts whose models all score the same get no loss-1 term; the quality
    used in the trade-off rule is softmax_m(s / tau)."""

    name = "routerdc"
    uses_torch = True

    @dataclass
    class Config:
        hidden: int = 128
        n_pos: int = 1
        n_neg: int = 1
        tau: float = 0.1
        n_clusters: int = 8
        sample_weight: float = 1.0
        epochs: int = 15
        lr: float = 3e-3
        seed: int = 0

    def _fit(self, train, x_ND):
        from sklearn.cluster import KMeans

        torch.manual_seed(self.cfg.seed)
        M = len(self.models)
        self.net = nets.DCEncoder(x_ND.shape[1], self.cfg.hidden, M)
        k = max(1, min(self.cfg.n_clusters, len(x_ND)))
        cl = torch.from_numpy(KMeans(k, n_init=2, random_state=self.cfg.seed).fit_predict(x_ND).astype(np.int64))
        x = torch.from_numpy(x_ND)
        s = torch.from_numpy(train.scores_PM.astype(np.float32))
        order = torch.argsort(s + 1e-4 * torch.rand(s.shape, generator=torch.Generator().manual_seed(0)),
                              dim=1, descending=True)
        n_pos, n_neg, tau = min(self.cfg.n_pos, M - 1), min(self.cfg.n_neg, M - 1), self.cfg.tau

        def loss(i):
            z, sim = self.net(x[i])
            total = torch.zeros(())
            if M > 1 and n_pos > 0:
                o = order[i]
                pos, neg = o[:, :n_pos], o[:, M - n_neg:]
                informative = (s[i].max(1).values > s[i].min(1).values)
                if informative.any():
                    sp, sn = sim.gather(1, pos) / tau, sim.gather(1, neg) / tau  # [B, n_pos], [B, n_neg]
                    logits = torch.cat([sp[:, :, None], sn[:, None, :].expand(-1, n_pos, -1)], 2)
                    l1 = -F.log_softmax(logits, dim=2)[:, :, 0].mean(1)
                    total = total + l1[informative].mean()
            c = cl[i]
            same = (c[:, None] == c[None, :]).float() - torch.eye(len(i))
            has = same.sum(1) > 0
            if has.any() and self.cfg.sample_weight > 0:
                logit = (z @ z.T) / tau - 1e9 * torch.eye(len(i))
                logp = F.log_softmax(logit, dim=1)
                l2 = -(logp * same).sum(1)[has] / same.sum(1)[has]
                total = total + self.cfg.sample_weight * l2.mean()
            return total

        _train(self.net, loss, len(x), self.cfg.epochs, 128, self.cfg.lr, 1e-5, self.cfg.seed)

    def _estimate(self, x_PD, batch):
        with torch.no_grad():
            _, sim = self.net(torch.from_numpy(x_PD))
            q = torch.softmax(sim / self.cfg.tau, dim=1).numpy().astype(np.float64)
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {"d_in": self.net.enc.l1.in_features}, _torch_state("dc", self.net)

    def _load_state(self, meta, t):
        self.net = nets.DCEncoder(meta["d_in"], self.cfg.hidden, len(self.models))
        _load_torch("dc", self.net, t)

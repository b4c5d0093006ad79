"""Model-level routers (choose which LLM answers each prompt). See :mod:`moelab.route.base`.

Shapes: P prompts routed, N training prompts, M models, D feature dim, H hidden dim,
K clusters or neighbours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError, check_range
from moelab.route.base import MODEL_ROUTERS, ModelRouter
from moelab.route.data import RoutingDataset, prompt_hash
from moelab.route.features import threads


def _torch_state(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _load_torch(prefix: str, module: torch.nn.Module, tensors: dict) -> None:
    sd = {k[len(prefix) + 1:]: torch.from_numpy(np.array(v)) for k, v in tensors.items()
          if k.startswith(prefix + ".")}
    module.load_state_dict(sd)


def _ridge(x_ND: np.ndarray, y_NM: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge with an unpenalised bias: returns (w_DM, b_M)."""
    mx, my = x_ND.mean(0), y_NM.mean(0)
    xc = (x_ND - mx).astype(np.float64)
    a = xc.T @ xc + alpha * np.eye(x_ND.shape[1])
    w_DM = np.linalg.solve(a, xc.T @ (y_NM - my))
    return w_DM.astype(np.float32), (my - mx @ w_DM).astype(np.float32)


# ====================================================================== reference points
@MODEL_ROUTERS.register("oracle", description="cheapest model with the best true score (upper bound)",
                        paper="RouterBench (Hu et al., 2024, arXiv:2403.12031): oracle_model_to_route_to")
class OracleRouter(ModelRouter):
    """Reads the true scores and costs of the batch: at ``mu = 0`` the cheapest model that scores
    best, and the best true trade-off at other ``mu``. An evaluation bound, not a deployable router."""

    name = "oracle"
    needs_features = False
    uses_truth = True

    def _estimate(self, x_PD, batch):
        return batch.scores_PM, batch.costs_PM


@MODEL_ROUTERS.register("random", description="random mix of the cheapest and the best single model",
                        paper="RouteLLM (Ong et al., 2024, arXiv:2406.18665): random router baseline")
class RandomRouter(ModelRouter):
    """Sends each prompt to the best single (training) model with probability ``1 - mu``, else to
    the cheapest; RouteLLM's random router for two models, extended to M models this way. The same
    uniform draws are reused across ``mu`` so the sweep traces the chord between the two models."""

    name = "random"
    needs_features = False

    @dataclass
    class Config:
        seed: int = 0

    def _estimate(self, x_PD, batch):
        P = self._n(x_PD, batch)
        ids = batch.prompt_ids if isinstance(batch, RoutingDataset) else [str(t) for t in batch]
        u_P = np.array([prompt_hash(f"{self.cfg.seed}:{i}") for i in ids]) if ids else np.zeros(P)
        q_PM = np.zeros((P, len(self.models)))
        q_PM[:, 0] = u_P  # carries the draws to decide_grid
        return q_PM, self._mean_costs(P)

    def decide_grid(self, q_PM, c_PM, mus):
        best, cheap = int(np.argmax(self.mean_q_M)), int(np.argmin(self.mean_cost_M))
        return np.stack([np.where(q_PM[:, 0] < 1.0 - m, best, cheap) for m in mus])


@MODEL_ROUTERS.register("best-single", description="always the model with the best mean training score",
                        paper="RouterBench (arXiv:2403.12031): single-model baselines")
class BestSingleRouter(ModelRouter):
    name = "best-single"
    needs_features = False

    def _estimate(self, x_PD, batch):
        P = self._n(x_PD, batch)
        return np.broadcast_to(self.mean_q_M, (P, len(self.models))).copy(), self._mean_costs(P)

    def decide_grid(self, q_PM, c_PM, mus):
        best = int(np.argmax(self.mean_q_M - 1e-12 * self.mean_cost_M))
        return np.full((len(mus), len(q_PM)), best)


@MODEL_ROUTERS.register("cheapest", description="always the model with the lowest mean training cost",
                        paper="RouterBench (arXiv:2403.12031): single-model baselines")
class CheapestRouter(BestSingleRouter):
    name = "cheapest"

    def decide_grid(self, q_PM, c_PM, mus):
        return np.full((len(mus), len(q_PM)), int(np.argmin(self.mean_cost_M)))


# ====================================================================== kNN
@MODEL_ROUTERS.register("knn", description="k nearest training prompts: mean score and cost per model",
                        paper="RouterBench (arXiv:2403.12031) kNN router; 'Rethinking Predictive Modeling for LLM "
                              "Routing: When Simple kNN Beats Complex Learned Routers' (2025)")
class KNNRouter(ModelRouter):
    """Cosine kNN over prompt features: quality and cost of model m = mean over the k nearest
    training prompts (RouterBench's predictive kNN router; the kNN-baseline paper's rule), then the
    trade-off argmax. Features are L2-normalised, so cosine = dot product."""

    name = "knn"

    @dataclass
    class Config:
        k: int = 20

    def _fit(self, train, x_ND):
        check_range("k", self.cfg.k, low=1)
        n = x_ND / (np.linalg.norm(x_ND, axis=1, keepdims=True) + 1e-8)
        self.x_ND = n.astype(np.float32)
        self.s_NM = train.scores_PM.astype(np.float32)
        self.c_NM = train.costs_PM.astype(np.float32)

    def _estimate(self, x_PD, batch):
        x = x_PD / (np.linalg.norm(x_PD, axis=1, keepdims=True) + 1e-8)
        sim_PN = x @ self.x_ND.T
        k = min(self.cfg.k, sim_PN.shape[1])
        nn_PK = np.argpartition(-sim_PN, k - 1, axis=1)[:, :k]
        return self.s_NM[nn_PK].mean(1).astype(np.float64), self.c_NM[nn_PK].mean(1).astype(np.float64)

    def _state(self):
        return {}, {"knn.x_ND": self.x_ND, "knn.s_NM": self.s_NM, "knn.c_NM": self.c_NM}

    def _load_state(self, meta, t):
        self.x_ND, self.s_NM, self.c_NM = t["knn.x_ND"], t["knn.s_NM"], t["knn.c_NM"]


# ====================================================================== per-model predictors
@MODEL_ROUTERS.register("linear", description="per-model ridge regression of the score on features",
                        paper="RouterBench (arXiv:2403.12031): predictive routers")
class LinearRouter(ModelRouter):
    """Per-model ridge regression predicts the score from the prompt features (RouterBench's
    predictive router family); cost = the model's mean training cost, as in RouterBench."""

    name = "linear"

    @dataclass
    class Config:
        alpha: float = 1.0

    def _fit(self, train, x_ND):
        self.w_DM, self.b_M = _ridge(x_ND, train.scores_PM, self.cfg.alpha)

    def _estimate(self, x_PD, batch):
        q = np.clip(x_PD @ self.w_DM + self.b_M, 0.0, 1.0).astype(np.float64)
        return q, self._mean_costs(len(x_PD))

    def _state(self):
        return {}, {"lin.w_DM": self.w_DM, "lin.b_M": self.b_M}

    def _load_state(self, meta, t):
        self.w_DM, self.b_M = t["lin.w_DM"], t["lin.b_M"]


class _MLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x_PD):
        return self.l2(F.gelu(self.l1(x_PD)))


def _train(module, loss_fn, n: int, epochs: int, batch: int, lr: float, wd: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            loss = loss_fn(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


@MODEL_ROUTERS.register("mlp", description="small MLP predicting every model's score (sigmoid, BCE)",
                        paper="RouterBench (arXiv:2403.12031): predictive MLP router")
class MLPRouter(ModelRouter):
    """One-hidden-layer MLP with M sigmoid outputs trained with BCE on the (soft) scores; cost = the
    model's mean training cost (RouterBench's MLP predictive router)."""

    name = "mlp"

    @dataclass
    class Config:
        hidden: int = 128
        epochs: int = 20
        lr: float = 3e-3
        weight_decay: float = 1e-4
        seed: int = 0

    def _fit(self, train, x_ND):
        torch.manual_seed(self.cfg.seed)
        self.net = _MLP(x_ND.shape[1], self.cfg.hidden, len(self.models))
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
        self.net = _MLP(meta["d_in"], self.cfg.hidden, len(self.models))
        _load_torch("mlp", self.net, t)


# ====================================================================== matrix factorisation
class _MF(torch.nn.Module):
    """RouteLLM's MFModel: delta(m, x) = w2^T (normalize(v_m) * (W1 x))."""

    def __init__(self, n_models: int, d_in: int, dim: int) -> None:
        super().__init__()
        self.P = torch.nn.Embedding(n_models, dim)
        self.text_proj = torch.nn.Linear(d_in, dim, bias=False)
        self.classifier = torch.nn.Linear(dim, 1, bias=False)

    def forward(self, x_PD):  # -> delta_PM
        v_MH = F.normalize(self.P.weight, dim=1)
        return self.classifier(self.text_proj(x_PD)[:, None, :] * v_MH[None]).squeeze(-1)


def _pairs(scores_NM: np.ndarray):
    """All (prompt, a, b) with s_a != s_b: label 1[s_a > s_b], weight |s_a - s_b|."""
    n_i, a_i, b_i, y, w = [], [], [], [], []
    M = scores_NM.shape[1]
    for a in range(M):
        for b in range(a + 1, M):
            d = scores_NM[:, a] - scores_NM[:, b]
            idx = np.flatnonzero(d != 0)
            n_i.append(idx), a_i.append(np.full(len(idx), a)), b_i.append(np.full(len(idx), b))
            y.append((d[idx] > 0).astype(np.float32)), w.append(np.abs(d[idx]).astype(np.float32))
    cat = lambda z: np.concatenate(z) if z else np.zeros(0)  # noqa: E731
    return cat(n_i).astype(np.int64), cat(a_i).astype(np.int64), cat(b_i).astype(np.int64), cat(y), cat(w)


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

    @dataclass
    class Config:
        dim: int = 128
        epochs: int = 40  # 10 underfit RouteLLM MMLU (AIQ 0.753 vs 0.763 for threshold at 40)
        lr: float = 3e-3
        weight_decay: float = 1e-5
        seed: int = 0

    def _fit(self, train, x_ND):
        torch.manual_seed(self.cfg.seed)
        self.net = _MF(len(self.models), x_ND.shape[1], self.cfg.dim)
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
        self.net = _MF(len(self.models), meta["d_in"], self.cfg.dim)
        _load_torch("mf", self.net, t)


# ====================================================================== CARROT
@MODEL_ROUTERS.register("carrot", description="per-model quality and cost regressors; argmax (1-mu)q - mu c",
                        paper="CARROT (Somerstep et al., 2025, arXiv:2502.03261)")
class CarrotRouter(ModelRouter):
    """CARROT: estimate each model's quality p_m(x) and cost c_m(x) with simple regressors on the
    prompt embedding, then pick argmax (1 - mu) p_m(x) - mu c_m(x). Choices: ridge regression for
    both (the paper's linear variant), cost regressed in log-USD (costs are positive and span
    orders of magnitude) and mapped back with exp."""

    name = "carrot"

    @dataclass
    class Config:
        alpha: float = 1.0

    def _fit(self, train, x_ND):
        self.wq_DM, self.bq_M = _ridge(x_ND, train.scores_PM, self.cfg.alpha)
        self.wc_DM, self.bc_M = _ridge(x_ND, np.log(train.costs_PM + 1e-12), self.cfg.alpha)

    def _estimate(self, x_PD, batch):
        q = np.clip(x_PD @ self.wq_DM + self.bq_M, 0.0, 1.0).astype(np.float64)
        c = np.exp(x_PD @ self.wc_DM + self.bc_M).astype(np.float64)
        return q, c

    def _state(self):
        return {}, {"carrot.wq": self.wq_DM, "carrot.bq": self.bq_M, "carrot.wc": self.wc_DM, "carrot.bc": self.bc_M}

    def _load_state(self, meta, t):
        self.wq_DM, self.bq_M, self.wc_DM, self.bc_M = t["carrot.wq"], t["carrot.bq"], t["carrot.wc"], t["carrot.bc"]


# ====================================================================== RouterDC
class _DCEncoder(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, n_models: int) -> None:
        super().__init__()
        self.enc = _MLP(d_in, hidden, hidden)
        self.k_MH = torch.nn.Parameter(torch.randn(n_models, hidden) * 0.1)

    def forward(self, x_PD):  # -> (z_PH normalised, sim_PM cosine)
        z = F.normalize(self.enc(x_PD), dim=-1)
        return z, z @ F.normalize(self.k_MH, dim=-1).T


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
        self.net = _DCEncoder(x_ND.shape[1], self.cfg.hidden, M)
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
        self.net = _DCEncoder(meta["d_in"], self.cfg.hidden, len(self.models))
        _load_torch("dc", self.net, t)


# ====================================================================== category table
@MODEL_ROUTERS.register("category", description="category -> model table (given or predicted category)",
                        paper="Composition of Experts: A Modular Compound AI System Leveraging LLMs (SambaNova, 2024); "
                              "Arch-Router (arXiv:2506.16655)")
class CategoryRouter(ModelRouter):
    """Two-step routing: a prompt's category (given by the batch, Arch-Router's policy label, or
    predicted by a nearest-centroid classifier on the features, CoE's category router) indexes a
    table of per-category mean score and cost per model; the trade-off rule picks the model.
    Categories unseen in training fall back to the global means."""

    name = "category"

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


# ====================================================================== universal routing
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


# ====================================================================== bandit feedback
class _Policy(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, n_models: int) -> None:
        super().__init__()
        self.net = _MLP(d_in + 2, hidden, n_models)

    def forward(self, x_PD, mu_P):  # preference vector w = (1 - mu, mu)
        return self.net(torch.cat([x_PD, (1 - mu_P)[:, None], mu_P[:, None]], 1))


_LOG_LAMBDA = (-3.5, 1.5)  # the sweep's range of lambda = mu / (1 - mu), log10


def _sample_mu(n: int, g: torch.Generator) -> torch.Tensor:
    """mu with log10(mu / (1 - mu)) uniform on _LOG_LAMBDA (the sweep's grid is log-spaced too)."""
    lo, hi = _LOG_LAMBDA
    lam = 10 ** (lo + (hi - lo) * torch.rand(n, generator=g))
    return lam / (1 + lam)


def _mu_bin(mu: torch.Tensor, n_bins: int) -> torch.Tensor:
    lo, hi = _LOG_LAMBDA
    u = (torch.log10(mu / (1 - mu)) - lo) / (hi - lo)
    return torch.clamp((u * n_bins).long(), 0, n_bins - 1)


@MODEL_ROUTERS.register("bandit", description="preference-conditioned policy learned from bandit feedback",
                        paper="BaRP (Wang et al., 2025, arXiv:2510.07429): bandit-feedback routing with preferences")
class BanditRouter(ModelRouter):
    """BaRP: a policy pi(m | x, w) over models, conditioned on the prompt features and a preference
    w = (1 - mu, mu); trained online where only the chosen model's reward
    r = (1 - mu) * score - mu * min(cost / c_scale, 1) is revealed (simulated from the matrix by hiding the
    other columns). REINFORCE with a running-mean reward baseline per mu-bin (the reward's scale
    depends strongly on mu; a global baseline drowned the action signal on RouteLLM MMLU and the
    policy collapsed to the cheap model), normalised advantages and an entropy bonus;
    mu ~ U[0, 1] per round so one policy serves every trade-off. ``regret_`` logs per-round regret (computed with
    the hidden columns, for diagnostics only)."""

    name = "bandit"

    @dataclass
    class Config:
        hidden: int = 64
        epochs: int = 4
        batch: int = 32
        lr: float = 3e-3
        entropy: float = 0.01
        seed: int = 0

    def _fit(self, train, x_ND):
        g = torch.Generator().manual_seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        self.net = _Policy(x_ND.shape[1], self.cfg.hidden, len(self.models))
        opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        x = torch.from_numpy(x_ND)
        s = torch.from_numpy(train.scores_PM.astype(np.float32))
        # BaRP's capped normalised cost: min(c / tau, 1), tau = the largest mean model cost
        c = torch.from_numpy(np.minimum(train.costs_PM / self.c_scale, 1.0).astype(np.float32))
        n_bins = 10
        baseline = torch.zeros(n_bins)  # running mean reward per mu-bin
        self.regret_ = []
        for _ in range(self.cfg.epochs):
            perm = torch.randperm(len(x), generator=g)
            for st in range(0, len(x), self.cfg.batch):
                i = perm[st:st + self.cfg.batch]
                mu = _sample_mu(len(i), g)
                logits = self.net(x[i], mu)
                dist = torch.distributions.Categorical(logits=logits)
                a = dist.sample()
                r_all = (1 - mu)[:, None] * s[i] - mu[:, None] * c[i]  # hidden except column a
                r = r_all.gather(1, a[:, None]).squeeze(1)
                self.regret_.append(float((r_all.max(1).values - r).mean()))
                bin_ = _mu_bin(mu, n_bins)
                adv = r - baseline[bin_]
                adv = adv / (adv.std() + 1e-6) if len(adv) > 1 else adv
                for k in bin_.unique():
                    baseline[k] = 0.9 * baseline[k] + 0.1 * r[bin_ == k].mean()
                loss = -(dist.log_prob(a) * adv).mean() - self.cfg.entropy * dist.entropy().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

    def _estimate(self, x_PD, batch):
        return x_PD, self._mean_costs(len(x_PD))  # decide_grid runs the policy per mu

    def decide_grid(self, q_PM, c_PM, mus):
        x = torch.from_numpy(np.asarray(q_PM, np.float32))
        with torch.no_grad(), threads():
            return np.stack([self.net(x, torch.full((len(x),), float(m))).argmax(1).numpy() for m in mus])

    def _state(self):
        return {"d_in": self.net.net.l1.in_features - 2}, _torch_state("barp", self.net)

    def _load_state(self, meta, t):
        self.net = _Policy(meta["d_in"], self.cfg.hidden, len(self.models))
        _load_torch("barp", self.net, t)


# ====================================================================== two-model routers
class _TwoModel(ModelRouter):
    two_model = True

    def _strong_weak(self) -> tuple[int, int]:
        s = int(np.argmax(self.mean_q_M - 1e-12 * self.mean_cost_M))
        return s, 1 - s

    def _thresholds(self, score_N: np.ndarray) -> None:
        self.train_score_N = np.sort(np.asarray(score_N, np.float64))

    @staticmethod
    def threshold_for(score_N: np.ndarray, frac: float) -> float:
        """RouteLLM's calibration: the (1 - frac) quantile of scores, so a fraction ``frac`` of the
        calibration prompts scores at or above it."""
        if frac <= 0:
            return np.inf
        return float(np.quantile(score_N, 1.0 - frac, method="higher")) if frac < 1 else -np.inf

    def calibrate(self, cal: RoutingDataset | list[str], strong_frac: float, x_PD=None) -> float:
        """Set the threshold so ``strong_frac`` of ``cal``'s prompts go to the strong model
        (RouteLLM's ``calibrate_threshold``). Returns the threshold."""
        check_range("strong_frac", strong_frac, low=0.0, high=1.0)
        self.threshold = self.threshold_for(self.hardness(cal, x_PD), strong_frac)
        return self.threshold

    def hardness(self, batch, x_PD=None) -> np.ndarray:
        q, _ = self.estimate(batch, x_PD)
        return q[:, self.strong] - q[:, self.weak]

    def route_calibrated(self, batch=None, x_PD=None) -> np.ndarray:
        if getattr(self, "threshold", None) is None:
            raise MoelabError(f"router {self.name!r} has no calibrated threshold; call calibrate() first")
        h = self.hardness(batch, x_PD)
        return np.where(h >= self.threshold, self.strong, self.weak)

    def decide_grid(self, q_PM, c_PM, mus):
        """mu -> target strong fraction 1 - mu -> the threshold calibrated on training prompts."""
        h = q_PM[:, self.strong] - q_PM[:, self.weak]
        thr = [self.threshold_for(self.train_score_N, 1.0 - float(m)) for m in mus]
        return np.stack([np.where(h >= t, self.strong, self.weak) for t in thr])

    def _state(self):
        return ({"strong": self.strong, "weak": self.weak, "threshold": getattr(self, "threshold", None)},
                {"two.train_score_N": self.train_score_N})

    def _load_state(self, meta, t):
        self.strong, self.weak, self.threshold = meta["strong"], meta["weak"], meta["threshold"]
        self.train_score_N = t["two.train_score_N"]


@MODEL_ROUTERS.register("threshold", description="RouteLLM strong/weak threshold on P(strong wins), calibrated",
                        paper="RouteLLM (Ong et al., 2024, arXiv:2406.18665): threshold routing + calibrate_threshold")
class ThresholdRouter(_TwoModel):
    """RouteLLM: route to the strong model when the win probability P(strong beats weak | x) >=
    alpha. The win probability comes from an MF model (RouteLLM's recommended router, trained as in
    :class:`MFRouter`). alpha is calibrated as RouteLLM does: the (1 - f) quantile of the scores on
    calibration prompts sends a fraction f to the strong model (:meth:`calibrate`). In the
    ``mu`` interface, f = 1 - mu with thresholds calibrated on the training prompts."""

    name = "threshold"

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


def router_info() -> list[dict]:
    return [{"name": e.name, "description": e.description, "paper": e.paper,
             "options": {f.name: f.default for f in dataclasses.fields(e.obj.Config)}}
            for e in MODEL_ROUTERS.entries()]

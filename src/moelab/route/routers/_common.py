"""Helpers shared by the model routers: lazy torch, ridge regression, training loop, state I/O.

torch is imported on first use (``torch``/``F``/``nets`` here are lazy module proxies), so
importing the routers, listing them, or routing with the numpy routers (knn, linear, carrot, ...)
never loads torch.
"""

from __future__ import annotations

import importlib

import numpy as np


class _LazyModule:
    """Attribute access imports the module (once; then Python's module cache answers)."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self.__dict__["_name"]), attr)


torch = _LazyModule("torch")
F = _LazyModule("torch.nn.functional")
nets = _LazyModule("moelab.route.routers._nets")


def _torch_state(prefix: str, module) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _load_torch(prefix: str, module, tensors: dict) -> None:
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


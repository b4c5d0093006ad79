"""Depth routing of a trained model (issue 17 part 3): the config, the registry, data and shared helpers.

``DEPTH_METHODS`` holds one class per method (one file each: ``drllm``, ``router_tuning``, ``duo``) with
``spec(model, cfg) -> dict`` (the ``ModelConfig.depth`` entry that rebuilds the routers) and
``fit(model, data, cfg) -> dict`` (search / train the routers in place; returns what it found). The
``budget`` is the fraction of the unmodified model's compute a method may use per token: executed layers
(Dr.LLM), executed attention blocks (Router-Tuning), FFN compute (Duo); see each method.

Data: windows of ``seq_len`` tokens from the run's own corpus, split into a prompt (the first half, what
per-sequence routers read) and a continuation (what is scored), as in ``moelab.ops.reroute.samples``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.registry import Registry

DEPTH_METHODS: Registry = Registry("depth-routing method")


@dataclass(kw_only=True)
class DepthConfig:
    """``method``, ``budget`` in (0, 1], ``seed``, ``train_windows`` (search / training windows from the
    train split), ``eval_windows`` (test windows per domain), router training ``steps``, ``lr``,
    ``batch_size``, and method ``options`` (see each method)."""

    method: str
    budget: float = 0.75
    seed: int = 0
    train_windows: int = 64
    eval_windows: int = 16
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "DepthConfig":
        self.method = canonical(self.method)
        check_choice("method", self.method, DEPTH_METHODS.names())
        if not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) or not 0 < self.budget <= 1:
            raise MoelabError(f"budget={self.budget!r} is not valid; expected a fraction of the model's compute "
                              "in (0, 1] (e.g. 0.75)")
        for name in ("train_windows", "eval_windows", "steps", "batch_size"):
            check_range(name, getattr(self, name), low=1)
        check_range("lr", self.lr, low=0.0, low_inclusive=False)
        return self


def canonical(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


@dataclass
class Windows:
    """``ids_NL`` token windows, ``prompt_len`` P, and each window's domain."""

    ids_NL: Tensor
    prompt_len: int
    domains: list[str]

    def batches(self, batch_size: int):
        for i in range(0, self.ids_NL.shape[0], batch_size):
            yield self.ids_NL[i:i + batch_size]


def make_windows(run, split: str, per_domain: int, *, seed: int = 0) -> Windows:
    """Up to ``per_domain`` full windows of each domain of ``split``, prompt = first half; shuffled by ``seed``."""
    from moelab.ops.reroute.run import load_docs
    from moelab.ops.reroute.samples import windows

    docs = load_docs(run, split)
    L = run.config.data.seq_len
    out = []
    for d in sorted({doc.domain for doc in docs}):
        out += windows(docs, run.tokenizer, L, domain=d, limit=per_domain)
    if not out:
        raise MoelabError(f"split {split!r} gives no full window of {L} tokens")
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [out[i] for i in order]
    return Windows(torch.stack([s.ids_L for s in out]), out[0].prompt_len, [s.domain for s in out])


def continuation_losses(model: nn.Module, ids_BL: Tensor, P: int) -> Tensor:
    """``[B]`` mean next-token loss on positions P..L-1, routers reading the first P positions."""
    from moelab.models.depth import route_prefix

    with route_prefix(model, P):
        logits = model(ids_BL).logits[:, P - 1:-1].float()
    tgt = ids_BL[:, P:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape).mean(1)


def freeze_all_but(model: nn.Module, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
    """Only ``trainable`` keep ``requires_grad`` (Router-Tuning: the rest of the model is frozen)."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return trainable


def focal_loss(logits_NC: Tensor, y_N: Tensor, gamma: float = 2.0, weight_C: Tensor | None = None) -> Tensor:
    """Focal loss (Lin et al. 2017) with class weights: mean of ``w_y (1 - p_y)^gamma (-log p_y)``."""
    logp = torch.log_softmax(logits_NC, -1).gather(1, y_N[:, None]).squeeze(1)
    w = torch.ones_like(logp) if weight_C is None else weight_C[y_N]
    return (w * (1 - logp.exp()).pow(gamma) * -logp).sum() / w.sum()


def class_weights(y_N: Tensor, C: int) -> Tensor:
    """Inverse-frequency class weights, mean 1 over the classes present (class balancing)."""
    n = torch.bincount(y_N, minlength=C).float()
    w = torch.where(n > 0, n.sum() / (n.clamp_min(1) * (n > 0).sum()), torch.zeros_like(n))
    return w

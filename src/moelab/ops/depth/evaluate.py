"""Score a depth-routed model against the unmodified one: continuation perplexity per domain and overall, and
the compute executed per token (attention and FFN sub-layers, matmul FLOPs; ``moelab.ops.depth.cost``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from moelab.ops.depth.base import Windows, continuation_losses
from moelab.ops.depth.cost import forward_cost


@dataclass
class DepthResult:
    name: str
    losses: dict[str, list[float]] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=lambda: {"attn": 0.0, "ffn": 0.0, "flops": 0.0, "tokens": 0.0})
    seconds: float = 0.0

    def loss(self, domain: str | None = None) -> float:
        xs = self.losses.get(domain, []) if domain else [x for v in self.losses.values() for x in v]
        return sum(xs) / len(xs) if xs else float("nan")

    def per_token(self, key: str) -> float:
        return self.cost[key] / max(self.cost["tokens"], 1.0)


@torch.no_grad()
def score(model: nn.Module, data: Windows, name: str, batch_size: int = 8) -> DepthResult:
    res, t0 = DepthResult(name), time.perf_counter()
    model.eval()
    for k, ids in enumerate(data.batches(batch_size)):
        loss_B = continuation_losses(model, ids, data.prompt_len)
        for j, v in enumerate(loss_B.tolist()):
            res.losses.setdefault(data.domains[k * batch_size + j], []).append(v)
        for key, v in forward_cost(model, *ids.shape).items():
            res.cost[key] += v
    res.seconds = time.perf_counter() - t0
    return res


def _ppl(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{math.exp(min(x, 50.0)):.2f}"


def table(results: list[DepthResult]) -> str:
    """Markdown table; the first result is the unmodified model."""
    base = results[0]
    domains = sorted({d for r in results for d in r.losses})
    head = ["method", *(f"{d} ppl" for d in domains), "overall ppl", "Δ loss", "attn layers / token",
            "FFN layers / token", "layers / token", "FLOPs / token vs base"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        a, f = r.per_token("attn"), r.per_token("ffn")
        cells = [r.name, *(_ppl(r.loss(d)) for d in domains), _ppl(r.loss()), f"{r.loss() - base.loss():+.4f}",
                 f"{a:.2f}", f"{f:.2f}", f"{(a + f) / 2:.2f}", f"{r.per_token('flops') / base.per_token('flops'):.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def to_dict(r: DepthResult, base: DepthResult) -> dict:
    return {"method": r.name, "loss": r.loss(), "ppl": math.exp(min(r.loss(), 50.0)),
            "per_domain": {d: {"loss": r.loss(d), "ppl": math.exp(min(r.loss(d), 50.0)), "windows": len(v)}
                           for d, v in r.losses.items()},
            "attn_layers_per_token": r.per_token("attn"), "ffn_layers_per_token": r.per_token("ffn"),
            "layers_per_token": (r.per_token("attn") + r.per_token("ffn")) / 2,
            "flops_per_token": r.per_token("flops"), "flops_vs_base": r.per_token("flops") / base.per_token("flops"),
            "seconds": r.seconds}

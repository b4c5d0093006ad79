"""Score re-routing methods against the unmodified model on held-out continuations.

Every method sees each evaluation sample's prompt (and, for the reference-based ones, the reference
set), produces router-logit offsets, and is scored by the continuation's next-token loss under them.
Reported per method: perplexity per domain and overall, the change against the unmodified model, and
the extra compute as forward-equivalent tokens per evaluated token (a backward counts two forwards;
the unmodified model's own forward is not counted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from moelab.ops.reroute.offsets import logit_offsets
from moelab.ops.reroute.samples import Sample, continuation_loss


@dataclass
class MethodResult:
    name: str
    losses: dict[str, list[float]] = field(default_factory=dict)  # domain -> per-sample continuation loss
    extra_tokens: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def loss(self, domain: str | None = None) -> float:
        xs = self.losses.get(domain, []) if domain else [x for v in self.losses.values() for x in v]
        return sum(xs) / len(xs) if xs else float("nan")

    def extra_per_token(self) -> float:
        return self.extra_tokens / self.tokens if self.tokens else 0.0


def score(model, sites, samples: list[Sample], name: str, method=None, refs=None, bar=None) -> MethodResult:
    """Continuation losses of ``samples`` with ``method``'s offsets (None: the unmodified model)."""
    res, t0 = MethodResult(name), time.perf_counter()
    for s in samples:
        deltas, extra = {}, 0.0
        if method is not None:
            a = method.adapt(model, sites, s, refs)
            deltas, extra = a.deltas, a.extra_tokens
        with torch.no_grad(), logit_offsets(sites, deltas):
            loss = float(continuation_loss(model, s))
        res.losses.setdefault(s.domain, []).append(loss)
        res.extra_tokens += extra
        res.tokens += len(s.ids_L)
        if bar is not None:
            bar.update(1)
    res.seconds = time.perf_counter() - t0
    return res


def _ppl(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{math.exp(min(x, 50.0)):.2f}"


def table(results: list[MethodResult], target: str | None) -> str:
    """Markdown table: the first result is the unmodified baseline."""
    base = results[0]
    domains = sorted({d for r in results for d in r.losses})
    head = ["method", *(f"{d} ppl" + (" (target)" if d == target else "") for d in domains), "overall ppl",
            "Δ overall loss", "extra fwd tokens / token", "seconds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.name, *(_ppl(r.loss(d)) for d in domains), _ppl(r.loss()), f"{r.loss() - base.loss():+.4f}",
                 f"{r.extra_per_token():.1f}", f"{r.seconds:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def to_dict(results: list[MethodResult]) -> list[dict]:
    return [{"method": r.name, "loss": r.loss(), "ppl": math.exp(min(r.loss(), 50.0)),
             "per_domain": {d: r.loss(d) for d in r.losses}, "samples": {d: len(v) for d, v in r.losses.items()},
             "extra_tokens_per_token": r.extra_per_token(), "seconds": r.seconds} for r in results]

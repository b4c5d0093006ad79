"""Test and reference samples: fixed-length windows of tokenised text, split into a prompt (what a
method may look at) and a continuation (what it is scored on), with the model's view of each.

A sample's *embedding* is the mean over its prompt positions of the input to its last MoE layer (the
model's own hidden state, as C3PO and R2-T2 use); its *pathway* is, per MoE layer, the mean over
prompt positions of the router's expert distribution (``probs_TE`` normalised to sum 1); its
*loss* is the mean next-token loss on the continuation. Reference samples are "successful" when
their loss is at or below the ``success_quantile`` of the reference set (a language-model stand-in
for the papers' correctly answered samples; documented choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_range
from moelab.models.moe_protocol import calibration_hooks


@dataclass
class Sample:
    ids_L: Tensor  # token ids of the whole window
    prompt_len: int
    domain: str
    embedding_D: Tensor | None = None
    pathway: dict[int, Tensor] | None = None  # layer -> [E] mean routing distribution over the prompt
    loss: float | None = None  # continuation loss of the unmodified model


def windows(docs, tokenizer, seq_len: int, *, domain: str | None = None, limit: int | None = None,
            prompt_frac: float = 0.5) -> list[Sample]:
    """Full windows of ``seq_len`` tokens from ``docs`` (moelab Documents), optionally of one domain."""
    from moelab.data.loader import eval_batches

    check_range("prompt_frac", prompt_frac, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    domains = sorted({d.domain for d in docs})
    if domain is not None and domain not in domains:
        raise MoelabError(f"domain={domain!r} has no documents; domains: {domains}")
    out: list[Sample] = []
    for batch in eval_batches(docs, tokenizer, seq_len, 16, [domain] if domain else domains):
        for row in range(batch.input_ids_BL.shape[0]):
            if bool(batch.valid_BL[row].all()):
                dom = domain or domains[int(batch.domain_B[row])]
                out.append(Sample(batch.input_ids_BL[row].clone(), max(1, int(seq_len * prompt_frac)), dom))
        if limit is not None and len(out) >= limit:
            break
    return out[:limit] if limit is not None else out


def continuation_loss(model: nn.Module, s: Sample) -> Tensor:
    """Mean next-token loss on the continuation (positions prompt_len..L-1 predicted from the window)."""
    ids = s.ids_L[None]
    logits = model(ids).logits[0].float()
    P = s.prompt_len
    return F.cross_entropy(logits[P - 1:-1], s.ids_L[P:])


def prompt_loss(model: nn.Module, s: Sample) -> Tensor:
    """Mean next-token loss on the prompt only (self-supervision: no continuation token is seen)."""
    ids = s.ids_L[None, : s.prompt_len]
    logits = model(ids).logits[0].float()
    return F.cross_entropy(logits[:-1], s.ids_L[1: s.prompt_len])


@torch.no_grad()
def describe(model: nn.Module, samples: list[Sample], *, with_loss: bool = True) -> list[Sample]:
    """Fill each sample's embedding and pathway (from the prompt alone) and, with ``with_loss``,
    the unmodified model's continuation loss."""
    for s in samples:
        seen: dict[int, Tensor] = {}
        last: list[Tensor] = []

        def grab(site, x_TD, _y, seen=seen, last=last):
            probs = site.layer.last_routing.probs_TE
            if probs is None:
                raise MoelabError(f"layer {site.index}'s router reports no probs_TE; re-routing needs them")
            p = probs.float().clamp_min(0)
            seen[site.index] = (p / p.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)
            last[:] = [x_TD.float().mean(0)]

        with calibration_hooks(model, grab):
            model(s.ids_L[None, : s.prompt_len])
        s.pathway, s.embedding_D = seen, last[0]
        if with_loss:
            s.loss = float(continuation_loss(model, s))
    return samples


def successful(refs: list[Sample], quantile: float) -> list[Sample]:
    """Reference samples whose loss is at or below the ``quantile`` of the reference losses."""
    check_range("success_quantile", quantile, low=0.0, high=1.0, low_inclusive=False)
    losses = torch.tensor([r.loss for r in refs])
    cut = float(torch.quantile(losses, quantile))
    return [r for r in refs if r.loss <= cut]


def neighbours(x: Sample, refs: list[Sample], k: int) -> tuple[list[Sample], Tensor]:
    """The ``k`` references most cosine-similar to ``x`` by embedding, with their similarities."""
    if k < 1 or k > len(refs):
        raise MoelabError(f"neighbours={k} is not valid for a reference set of {len(refs)} successful samples; "
                          f"choose 1..{len(refs)} (or a larger reference set / success quantile)")
    E_RD = torch.stack([r.embedding_D for r in refs])
    sim_R = F.cosine_similarity(E_RD, x.embedding_D[None], dim=-1)
    top = sim_R.topk(k)
    return [refs[i] for i in top.indices.tolist()], top.values

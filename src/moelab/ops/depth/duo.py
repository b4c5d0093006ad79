"""Duo-LLM (Alizadeh et al. 2024, "Duo-LLM: A Framework for Studying Adaptive Computation in Large Language
Models"): per token and FFN layer choose skip, a small FFN or the big FFN; with the oracle analysis.

Steps (retrofit of a trained model; the paper trains the model with both modules from the start):
1. Small FFNs (ours, documented): a dense SwiGLU FFN of ``small_ff`` hidden units per block (default: a
   quarter of the big FFN's active hidden units), trained by regression (MSE) onto the big FFN's output on
   the training windows' tokens, the rest frozen.
2. Oracle: every routing pattern in ``{skip, small, big}^n_layers`` (at most ``max_patterns``; beyond that
   a seeded sample plus the uniform patterns) applied to all tokens of the windows; each token's next-token
   loss under each pattern. A token's oracle is its lowest-loss pattern whose FFN cost (skip 0, small
   ``small_cost``, big 1; mean over layers) is within the budget. Our simplification: the paper's oracle
   searches routes per token; here the other tokens of the window follow the same pattern.
   The analysis reported: mean loss of the oracle vs the unmodified model; a token's *benefit from the big
   path* = best loss without any big module minus the best within budget with one; the fraction of
   tokens that benefit (> 0.01 nats) and its correlation with the token's base loss (difficulty); and the
   paper's finding "big in one layer beats big in every layer": how often the best pattern with exactly one
   big layer (small elsewhere) is at least as good as all-big.
3. Routers: ``Linear(D, 3)`` per layer, cross-entropy (inverse-frequency class weights) on the oracle's
   action, each token's input taken from the forward under its own oracle pattern (teacher forcing).
4. Budget: the price ``penalty`` on FFN cost (decision = argmax(logits - penalty x cost)) is set by
   bisection so that the mean FFN cost on the training windows is within the budget (ours).
"""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.models.depth import depth_routers, forcing, route_prefix
from moelab.ops.depth.base import DEPTH_METHODS, DepthConfig, Windows, class_weights, freeze_all_but
from moelab.ops.depth.cost import ffn_flops


def big_hidden(block: nn.Module) -> int:
    """Active hidden units of the block's FFN (MoE: k x d_ff plus shared experts)."""
    return int(round(ffn_flops(block) / (6 * block.ffn_norm.weight.numel())))


def token_losses(model: nn.Module, ids_BL: Tensor) -> Tensor:
    """``[B, L-1]`` next-token losses."""
    logits = model(ids_BL).logits[:, :-1].float()
    tgt = ids_BL[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)


@torch.no_grad()
def ffn_pairs(model: nn.Module, ids_NL: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Per block: (normed FFN input ``[T, D]``, big-FFN residual update ``[T, D]``) of the base model."""
    out: list[list] = [[[], []] for _ in model.blocks]
    hooks = []
    for i, b in enumerate(model.blocks):
        hooks.append(b.ffn_norm.register_forward_hook(lambda _m, _a, h, i=i: out[i][0].append(h.reshape(-1, h.shape[-1]))))
    try:
        with forcing(model, {i: 2 for i in range(len(model.blocks))}):
            for k in range(0, ids_NL.shape[0], batch_size):
                model(ids_NL[k:k + batch_size])
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for i, b in enumerate(model.blocks):
        h = torch.cat(out[i][0])
        y = torch.cat([b.ffn(c) for c in h.split(4096)]) if not b.is_moe else torch.cat(
            [b.ffn(c, None) for c in h.split(4096)])
        pairs.append((h, y))
    return pairs


def fit_small(model: nn.Module, pairs, cfg: DepthConfig) -> list[float]:
    """Regress each small FFN onto its big FFN's output (MSE, Adam); returns the final relative errors."""
    routers = depth_routers(model)
    params = freeze_all_but(model, [p for r in routers for p in r.small.parameters()])
    opt = torch.optim.Adam(params, lr=float(cfg.options.get("small_lr", 3e-3)))
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(int(cfg.options.get("small_steps", cfg.steps))):
        loss = 0.0
        for r, (h, y) in zip(routers, pairs):
            idx = torch.randint(0, h.shape[0], (512,), generator=g)
            loss = loss + F.mse_loss(r.small(h[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [float((r.small(h) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12)) for r, (h, y) in zip(routers, pairs)]


def patterns(n: int, limit: int, seed: int) -> list[tuple[int, ...]]:
    allp = list(itertools.product((0, 1, 2), repeat=n)) if 3 ** n <= limit else None
    if allp is not None:
        return allp
    rng = random.Random(seed)
    pats = {(a,) * n for a in (0, 1, 2)} | {tuple(rng.choice((0, 1, 2)) for _ in range(n)) for _ in range(limit)}
    return sorted(pats)


@torch.no_grad()
def pattern_losses(model: nn.Module, data: Windows, pats, batch_size: int) -> Tensor:
    """``[patterns, N, L-1]`` next-token losses with each pattern applied to every token."""
    out = []
    for p in pats:
        with forcing(model, dict(enumerate(p))):
            out.append(torch.cat([token_losses(model, b) for b in data.batches(batch_size)]))
    return torch.stack(out)


def pattern_cost(pats, small_cost: float) -> Tensor:
    c = torch.tensor([0.0, small_cost, 1.0])
    return c[torch.tensor(pats)].mean(1)


def oracle_analysis(losses: Tensor, pats, cost: Tensor, budget: float) -> tuple[Tensor, dict]:
    """Oracle pattern index per token ``[N, L-1]`` and the analysis (see the module docstring)."""
    P = torch.tensor(pats)
    feasible = cost <= budget + 1e-9
    big = (P == 2).any(1)
    inf = torch.tensor(float("inf"))
    masked = torch.where(feasible[:, None, None], losses, inf)
    best, arg = masked.min(0)
    base = losses[pats.index((2,) * len(pats[0]))]
    no_big = torch.where((~big)[:, None, None], losses, inf).min(0).values
    with_big = torch.where((big & feasible)[:, None, None], losses, inf).min(0).values
    gain = (no_big - with_big)[torch.isfinite(with_big)]
    base_f = base[torch.isfinite(with_big)]
    one_big = ((P == 2).sum(1) == 1) & ((P == 1).sum(1) == len(pats[0]) - 1)
    one = torch.where(one_big[:, None, None], losses, inf).min(0).values
    corr = float(torch.corrcoef(torch.stack([gain, base_f]))[0, 1]) if gain.numel() > 1 else float("nan")
    return arg, {"base_loss": float(base.mean()), "oracle_loss": float(best.mean()),
                 "oracle_cost": float(cost[arg].mean()), "benefit_from_big_frac": float((gain > 0.01).float().mean()),
                 "benefit_from_big_mean": float(gain.mean()), "benefit_vs_base_loss_corr": corr,
                 "one_big_beats_all_big_frac": float((one <= base).float().mean()),
                 "one_big_loss": float(one.mean()), "patterns": len(pats)}


@torch.no_grad()
def oracle_features(model: nn.Module, data: Windows, pats, arg: Tensor, batch_size: int):
    """Per block ``(h [T, D], label [T])``: each token's FFN input under its own oracle pattern."""
    n = len(model.blocks)
    hs: list[list[Tensor]] = [[] for _ in range(n)]
    ys: list[list[Tensor]] = [[] for _ in range(n)]
    ids = data.ids_NL[:, :-1]
    for k in sorted(set(arg.flatten().tolist())):
        sel = arg == k
        rows = sel.any(1).nonzero().flatten()
        seen: list[list[Tensor]] = [[] for _ in range(n)]
        hooks = [b.ffn_norm.register_forward_hook(lambda _m, _a, h, s=seen[i]: s.append(h))
                 for i, b in enumerate(model.blocks)]
        try:
            with forcing(model, dict(enumerate(pats[k]))):
                model(ids[rows])
        finally:
            for h in hooks:
                h.remove()
        for i in range(n):
            hs[i].append(seen[i][0][sel[rows]])
            ys[i].append(torch.full((int(sel.sum()),), pats[k][i], dtype=torch.long))
    return [(torch.cat(hs[i]), torch.cat(ys[i])) for i in range(n)]


def train_gates(model: nn.Module, feats, cfg: DepthConfig) -> list[float]:
    routers = depth_routers(model)
    params = freeze_all_but(model, [p for r in routers for p in r.gate.parameters()])
    opt = torch.optim.AdamW(params, lr=float(cfg.options.get("router_lr", 1e-2)))
    w = [class_weights(y, 3) for _, y in feats]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.steps):
        loss = 0.0
        for r, (h, y), wi in zip(routers, feats, w):
            idx = torch.randint(0, h.shape[0], (1024,), generator=g)
            loss = loss + F.cross_entropy(r.gate(h[idx]), y[idx], weight=wi)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [float((r.gate(h).argmax(-1) == y).float().mean()) for r, (h, y) in zip(routers, feats)]


@torch.no_grad()
def mean_ffn_cost(model: nn.Module, data: Windows, batch_size: int) -> float:
    tot, n = 0.0, 0
    for b in data.batches(batch_size):
        with route_prefix(model, data.prompt_len):
            model(b)
        c = torch.stack([r.cost_3[r.last_action].float() for r in depth_routers(model)])
        tot, n = tot + float(c.mean(0).sum()), n + b.numel()
    return tot / n


def calibrate_penalty(model: nn.Module, data: Windows, budget: float, batch_size: int, iters: int = 14) -> float:
    """The price on FFN cost (bisection over [-64, 64]; negative = a subsidy) giving the largest mean FFN cost
    within ``budget`` on ``data`` (cost falls as the price rises)."""
    routers = depth_routers(model)

    def cost_at(beta: float) -> float:
        for r in routers:
            r.penalty.fill_(beta)
        return mean_ffn_cost(model, data, batch_size)

    lo, hi = -64.0, 64.0
    if cost_at(lo) <= budget:
        return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_at(mid) > budget else (lo, mid)
    cost_at(hi)
    return hi


@DEPTH_METHODS.register("duo", description="per-token skip / small FFN / big FFN routers with an oracle analysis",
                        paper="Alizadeh et al. 2024 (Duo-LLM)")
class Duo:
    budget_unit = "FFN compute per token (fraction; small FFN = its cost)"

    def spec(self, model: nn.Module, cfg: DepthConfig) -> dict:
        big = min(big_hidden(b) for b in model.blocks)
        small = int(cfg.options.get("small_ff", max(1, big // 4)))
        cost = max(6.0 * model.cfg.d_model * small / ffn_flops(b) for b in model.blocks)
        return {"method": "duo", "small_ff": small, "small_cost": round(cost, 6)}

    def fit(self, model: nn.Module, data: Windows, cfg: DepthConfig) -> dict:
        model.eval()
        with torch.no_grad():
            for r in depth_routers(model):
                for p in r.small.parameters():
                    p.normal_(0.0, model.cfg.init_std)
        small_err = fit_small(model, ffn_pairs(model, data.ids_NL, cfg.batch_size), cfg)
        small_cost = float(depth_routers(model)[0].cost_3[1])
        pats = patterns(model.cfg.n_layers, int(cfg.options.get("max_patterns", 729)), cfg.seed)
        losses = pattern_losses(model, data, pats, cfg.batch_size)
        arg, info = oracle_analysis(losses, pats, pattern_cost(pats, small_cost), cfg.budget)
        acc = train_gates(model, oracle_features(model, data, pats, arg, cfg.batch_size), cfg)
        penalty = calibrate_penalty(model, data, cfg.budget, cfg.batch_size)
        for p in model.parameters():
            p.requires_grad_(False)
        return {"small_rel_error": small_err, "oracle": info, "router_accuracy": acc, "penalty": penalty}

"""Dr.LLM (Heakl et al. 2025, "Dr.LLM: Dynamic Layer Routing in LLMs"): supervise per-layer skip / execute /
repeat routers with layer configurations found by an offline search under a compute budget.

1. Search (per training window): a Monte Carlo Tree Search over layer configurations, one tree level per
   block, actions skip (cost 0) / execute (1) / repeat (2), only configurations with total cost
   <= ``budget x n_layers`` allowed (the budget; the unmodified model costs n_layers). Reward = the
   unmodified model's continuation loss minus the configuration's (higher is better). UCT selection
   (c = ``uct_c``), expansion of one untried action, a random feasible rollout to a full configuration,
   backup of the reward; ``simulations`` per window. The window's target is the best configuration
   evaluated (ties: fewer layers), the paper's "accuracy-preserving or improving" paths under the budget;
   when the budget allows every layer, "execute all" is a candidate from the start.
   Our simplifications (documented): the paper's MCTS is length-aware with its own reward shaping and runs
   on task accuracy; ours scores the next-token loss of the window's continuation, and every evaluated
   configuration is cached and scored on all training windows in one batched pass (so trees share
   evaluations; a tiny model has only 3^n_layers configurations).
2. Training (teacher forcing, as the paper trains on MCTS paths): each window is run under its target
   configuration; each block's router gets the windowed mean pooling of its input over the prompt and
   learns the target action with focal loss (gamma 2) and inverse-frequency class weights (the paper's
   answer to "execute" dominating), AdamW at ``lr`` (paper: 1e-3), the base model frozen.
Also reported (ours): ``best_static_config``, the configuration (among those the search evaluated, within
the budget) with the lowest mean loss over all training windows: the same fixed layer-drop for every input,
the baseline a per-input router has to beat (``moelab depth-route`` scores it on the test windows too).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor, nn

from moelab.models.depth import depth_routers, forcing
from moelab.ops.depth.base import DEPTH_METHODS, DepthConfig, Windows, class_weights, continuation_losses, focal_loss


class ConfigScores:
    """Continuation losses ``[N]`` of every training window under a forced configuration (cached)."""

    def __init__(self, model: nn.Module, data: Windows, batch_size: int) -> None:
        self.model, self.data, self.bs = model, data, batch_size
        self.cache: dict[tuple[int, ...], Tensor] = {}

    @torch.no_grad()
    def __call__(self, config: tuple[int, ...]) -> Tensor:
        if config not in self.cache:
            with forcing(self.model, dict(enumerate(config))):
                self.cache[config] = torch.cat([continuation_losses(self.model, b, self.data.prompt_len)
                                                for b in self.data.batches(self.bs)])
        return self.cache[config]


def mcts(n_layers: int, cap: int, reward, *, simulations: int, c: float, rng: random.Random) -> tuple[int, ...]:
    """Best configuration found by UCT over ``{0, 1, 2}^n_layers`` with total cost <= ``cap``."""
    N: dict[tuple, int] = {}
    W: dict[tuple, float] = {}
    best, best_key = None, None
    if n_layers <= cap:  # the unmodified path is always a candidate: the search keeps or improves on it
        best = (1,) * n_layers
        best_key = (reward(best), -n_layers)
    for _ in range(simulations):
        path, node = [()], ()
        while len(node) < n_layers:
            acts = [a for a in (0, 1, 2) if sum(node) + a <= cap]
            untried = [a for a in acts if node + (a,) not in N]
            if untried:
                node = node + (rng.choice(untried),)
                path.append(node)
                break
            log_n = math.log(N[node])
            node = max((node + (a,) for a in acts), key=lambda ch: W[ch] / N[ch] + c * math.sqrt(log_n / N[ch]))
            path.append(node)
        config = node
        while len(config) < n_layers:  # random feasible rollout
            config = config + (rng.choice([a for a in (0, 1, 2) if sum(config) + a <= cap]),)
        r = reward(config)
        key = (r, -sum(config))
        if best_key is None or key > best_key:
            best, best_key = config, key
        for p in path:
            N[p] = N.get(p, 0) + 1
            W[p] = W.get(p, 0.0) + r
    return best


def search_targets(model: nn.Module, data: Windows, cfg: DepthConfig) -> tuple[list[tuple[int, ...]], ConfigScores]:
    """One target configuration per training window (MCTS under the budget)."""
    n = model.cfg.n_layers
    cap = int(math.floor(cfg.budget * n + 1e-9))
    scores = ConfigScores(model, data, cfg.batch_size)
    base = scores((1,) * n)
    rng = random.Random(cfg.seed)
    sims = int(cfg.options.get("simulations", 48))
    c = float(cfg.options.get("uct_c", 0.5))
    targets = [mcts(n, cap, lambda conf, i=i: float(base[i] - scores(conf)[i]), simulations=sims, c=c, rng=rng)
               for i in range(data.ids_NL.shape[0])]
    return targets, scores


@torch.no_grad()
def router_inputs(model: nn.Module, data: Windows, targets: list[tuple[int, ...]]) -> list[Tensor]:
    """Per block ``[N, W, D]`` pooled router inputs with each window run under its target (teacher forcing)."""
    routers = depth_routers(model)
    feats = [[None] * len(targets) for _ in routers]
    seen: list[list[Tensor]] = [[] for _ in routers]
    hooks = [model.blocks[r.layer_index].register_forward_pre_hook(
        lambda _b, args, r=r, out=seen[i]: out.append(r.pooled(args[0][:, : data.prompt_len])))
        for i, r in enumerate(routers)]
    try:
        for conf in sorted(set(targets)):
            idx = [n for n, t in enumerate(targets) if t == conf]
            for s in seen:
                s.clear()
            with forcing(model, dict(enumerate(conf))):
                continuation_losses(model, data.ids_NL[idx], data.prompt_len)
            for i, s in enumerate(seen):
                for n, row in zip(idx, s[0]):
                    feats[i][n] = row
    finally:
        for h in hooks:
            h.remove()
    return [torch.stack(f) for f in feats]


def train_routers(model: nn.Module, feats: list[Tensor], targets: list[tuple[int, ...]], cfg: DepthConfig) -> list[float]:
    """Focal-loss training of every block's router on its teacher-forced inputs; returns final losses."""
    routers = depth_routers(model)
    params = [p for r in routers for p in r.mlp.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    y = torch.tensor(targets, dtype=torch.long)  # [N, n_layers]
    w = [class_weights(y[:, i], 3) for i in range(len(routers))]
    g = torch.Generator().manual_seed(cfg.seed)
    losses = [0.0] * len(routers)
    for _ in range(cfg.steps):
        idx = torch.randint(0, y.shape[0], (min(cfg.batch_size * 4, y.shape[0]),), generator=g)
        loss = sum(focal_loss(r.logits(feats[i][idx]), y[idx, i], 2.0, w[i]) for i, r in enumerate(routers))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses = [float(focal_loss(r.logits(feats[i]), y[:, i], 2.0, w[i])) for i, r in enumerate(routers)]
    return losses


@DEPTH_METHODS.register("drllm", description="per-layer skip/execute/repeat routers supervised by MCTS under a budget",
                        paper="Heakl et al. 2025 (Dr.LLM)")
class DrLLM:
    budget_unit = "layers executed per token (repeat counts 2)"

    def spec(self, model: nn.Module, cfg: DepthConfig) -> dict:
        o = cfg.options
        return {"method": "drllm", "hidden": int(o.get("hidden", 128)), "windows": int(o.get("windows", 8))}

    def fit(self, model: nn.Module, data: Windows, cfg: DepthConfig) -> dict:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        targets, scores = search_targets(model, data, cfg)
        for r in depth_routers(model):
            r.mlp.requires_grad_(True)
        final = train_routers(model, router_inputs(model, data, targets), targets, cfg)
        y = torch.tensor(targets)
        base = scores((1,) * model.cfg.n_layers)
        best = torch.stack([scores(t)[i] for i, t in enumerate(targets)])
        cap = cfg.budget * model.cfg.n_layers + 1e-9
        static = min((c for c in scores.cache if sum(c) <= cap), key=lambda c: float(scores(c).mean()))
        return {"configs_evaluated": len(scores.cache), "best_static_config": list(static),
                "best_static_loss": float(scores(static).mean()),
                "target_layers_per_window": float(y.sum(1).float().mean()),
                "target_action_freq": {a: float((y == k).float().mean())
                                       for k, a in enumerate(("skip", "execute", "repeat"))},
                "search_loss": float(best.mean()), "base_loss": float(base.mean()), "router_focal_loss": final}

"""Helpers for the analysis tests: a test-only MoE layer with the MoELayer contract and a short
real training run (moelab.train) that uses it, so traces and reports run end to end in seconds."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moelab.layers.routing import RoutingResult


class TinyMoE(nn.Module):
    """Softmax router (``router`` = Linear(D, E)) and a plain loop over E small experts.

    ``top_p=None``: fixed top-k (``RoutingResult.from_topk``); ``top_p=p``: a variable number of
    experts per token (smallest set whose probability reaches p; ``from_mask``), to exercise CSR.
    Sets ``last_routing``, ``last_aux`` and ``last_stats`` like ``moelab.layers.moe.MoELayer``.
    """

    def __init__(self, cfg, top_p: float | None = None):
        super().__init__()
        self.cfg, self.top_p = cfg, top_p
        E, D, Fh = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.router = nn.Linear(D, E, bias=False)
        self.w_in_EFD = nn.Parameter(torch.randn(E, Fh, D) * 0.05)
        self.w_out_EDF = nn.Parameter(torch.randn(E, D, Fh) * 0.05)
        self.aux_loss_scale = 1.0
        self.last_routing, self.last_aux, self.last_stats = None, {}, {}

    def forward(self, x_TD, ctx=None):
        E, K = self.cfg.num_experts, self.cfg.k
        probs_TE = F.softmax(self.router(x_TD).float(), dim=-1)
        valid_T = None if ctx is None else ctx.valid_T
        if self.top_p is None:
            w_TK, idx_TK = probs_TE.topk(K, dim=-1)
            r = RoutingResult.from_topk(idx_TK, w_TK, E, probs_TE=probs_TE, valid_T=valid_T)
        else:
            sp, si = probs_TE.sort(dim=-1, descending=True)
            keep = (sp.cumsum(-1) - sp) < self.top_p
            mask_TE = torch.zeros_like(keep).scatter(1, si, keep)
            r = RoutingResult.from_mask(mask_TE, probs_TE, probs_TE=probs_TE, valid_T=valid_T)
        y_TD = torch.zeros_like(x_TD)
        for e in range(E):
            sel = r.expert_S == e
            tok = r.token_S[sel]
            if tok.numel():
                h = F.gelu(x_TD[tok] @ self.w_in_EFD[e].T) @ self.w_out_EDF[e].T
                y_TD = y_TD.index_add(0, tok, h * r.weight_S[sel, None].to(x_TD.dtype))
        counts = r.counts_E().float()
        ept = r.experts_per_token_T()
        p = (probs_TE / probs_TE.sum(-1, keepdim=True)).detach()
        self.last_routing = RoutingResult(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in vars(r).items()})
        self.last_aux = {}
        self.last_stats = {
            "counts": counts.long().tolist(), "load_max_over_mean": float(counts.max() / counts.mean()),
            "load_cv": float(counts.std(unbiased=False) / counts.mean()), "dropped_frac": 0.0,
            "router_entropy": float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()),
            "experts_per_token": float(ept.float().mean()),
            "experts_per_token_hist": torch.bincount(ept).tolist(),
            "unused_experts": int((counts == 0).sum()), "bias_norm": 0.0,
        }
        return y_TD


def install_tiny_moe(mp, top_p=None):
    import moelab.models.transformer as tr

    mp.setattr(tr, "_default_moe_factory", lambda cfg: TinyMoE(cfg, top_p=top_p))


WORDS_A = "the river runs under old stone bridges while quiet boats drift past green banks".split()
WORDS_B = "def add ( x , y ) : return x + y ; for i in range ( 10 ) : print ( i )".split()


def make_corpus(root: Path, n_docs: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for dom, words in (("prose", WORDS_A), ("code", WORDS_B)):
        d = root / dom
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_docs):
            (d / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(120)))
    return root


def micro_config(corpus: Path, cache: Path, steps: int = 8):
    from moelab.data.corpus import DataConfig
    from moelab.layers.config import MoEConfig
    from moelab.models.config import ModelConfig
    from moelab.train.config import RunConfig, TrainConfig

    d = 32
    return RunConfig(
        model=ModelConfig(vocab_size=300, d_model=d, n_layers=2, n_heads=2, max_seq_len=32, d_ff_dense=64,
                          moe=MoEConfig(d_model=d, d_ff=32, num_experts=4, k=2, aux_loss="none")),
        data=DataConfig(source=str(corpus), tokenizer="byte", seq_len=32, val_fraction=0.2, test_fraction=0.1,
                        cache_dir=str(cache)),
        train=TrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, eval_max_batches=2,
                          ckpt_every=4, keep_last=5, device="cpu", log_every=100),
    )


def train_micro_run(tmp: Path, name: str = "run", top_p=None, steps: int = 8) -> Path:
    from moelab.train.trainer import train

    corpus = make_corpus(tmp / "corpus")
    cfg = micro_config(corpus, tmp / "cache", steps=steps)
    run_dir = tmp / name
    with pytest.MonkeyPatch.context() as mp:
        install_tiny_moe(mp, top_p=top_p)
        torch.manual_seed(0)
        train(cfg, run_dir, progress="off")
    return run_dir

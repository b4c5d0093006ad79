"""Named starting configurations: ``tiny`` (CPU demo), ``small`` and ``base``; layout variants of
``tiny`` at its token budget: ``tiny-unipool-100``/``-66``/``-50`` (UniPool shared pool at 100%, 66.7%,
50% of the vanilla expert budget) and ``tiny-dynamoe`` (DynaMoE descending expert schedule).

``tiny`` is tuned to reach a meaningful loss in about three minutes on two CPU cores on the
embedded corpus (stdlib code + pydoc prose, each domain capped so tokenisation stays quick).
"""

from __future__ import annotations

from collections.abc import Callable

from moelab.data.corpus import DataConfig
from moelab.errors import check_choice
from moelab.layers.config import MoEConfig
from moelab.layers.layouts import LayoutConfig
from moelab.models.config import ModelConfig
from moelab.train.config import RunConfig, TrainConfig


def tiny() -> RunConfig:
    d = 128
    return RunConfig(
        model=ModelConfig(vocab_size=4096, d_model=d, n_layers=4, n_heads=4, max_seq_len=128, d_ff_dense=4 * d,
                          moe=MoEConfig(d_model=d, d_ff=256, num_experts=8, k=2), moe_layers="all"),
        data=DataConfig(vocab_size=4096, seq_len=128, max_chars_per_domain=1_500_000),
        train=TrainConfig(steps=600, batch_size=16, lr=3e-3, warmup_steps=30, eval_every=200,
                          eval_max_batches=8, ckpt_every=200, log_every=25),
    )


def small() -> RunConfig:
    d = 256
    return RunConfig(
        model=ModelConfig(vocab_size=8192, d_model=d, n_layers=6, n_heads=8, max_seq_len=256, d_ff_dense=4 * d,
                          moe=MoEConfig(d_model=d, d_ff=512, num_experts=8, k=2), moe_layers="all"),
        data=DataConfig(vocab_size=8192, seq_len=256, max_chars_per_domain=4_000_000),
        train=TrainConfig(steps=2000, batch_size=16, lr=2e-3, warmup_steps=100, eval_every=500,
                          eval_max_batches=16, ckpt_every=500),
    )


def base() -> RunConfig:
    d = 512
    return RunConfig(
        model=ModelConfig(vocab_size=16384, d_model=d, n_layers=8, n_heads=8, max_seq_len=512, d_ff_dense=4 * d,
                          moe=MoEConfig(d_model=d, d_ff=1024, num_experts=16, k=2), moe_layers="all"),
        data=DataConfig(vocab_size=16384, seq_len=512),
        train=TrainConfig(steps=10000, batch_size=32, lr=1e-3, warmup_steps=500, eval_every=1000,
                          eval_max_batches=32, ckpt_every=1000, dtype="bfloat16"),
    )


def tiny_unipool(fraction: float) -> RunConfig:
    """``tiny`` as UniPool (Huang et al. 2026): one pool of ``fraction`` x 32 experts (4 MoE layers x 8)
    shared by per-layer NormRouters, balanced by the pool-level loss (lagged, coef 0.01) instead of
    the per-layer Switch loss. Same k, data, steps and tokens as ``tiny``."""
    cfg = tiny()
    cfg.model.moe.router, cfg.model.moe.aux_loss = "norm", "none"
    cfg.model.layout = LayoutConfig(kind="shared_pool", pool_fraction=fraction, pool_loss_coef=0.01)
    return cfg


def tiny_dynamoe() -> RunConfig:
    """``tiny`` with DynaMoE's descending expert schedule (best for its tiny LM): 12, 9, 7, 4 experts
    over the 4 MoE layers, the same 32-expert budget and k=2 everywhere."""
    cfg = tiny()
    cfg.model.layout = LayoutConfig(kind="per_layer", schedule="descending")
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "tiny": tiny, "small": small, "base": base,
    "tiny-unipool-100": lambda: tiny_unipool(1.0),
    "tiny-unipool-66": lambda: tiny_unipool(2 / 3),
    "tiny-unipool-50": lambda: tiny_unipool(0.5),
    "tiny-dynamoe": tiny_dynamoe,
}


def preset(name: str) -> RunConfig:
    """A fresh RunConfig of preset ``name``."""
    return PRESETS[check_choice("preset", name, PRESETS)]()

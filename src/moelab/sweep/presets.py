"""Named sweep presets on the embedded corpus, each answering one question of the seed papers.

All start from the ``tiny`` RunConfig preset (4 layers, d_model 128, 8 experts of d_ff 256, top-2,
BPE 4096, sequences of 128) with a reduced budget (:data:`BUDGET`: 300 steps of 16 x 128 tokens =
614k tokens, evaluation on the same 8 batches per domain) so that ``balancing`` with one seed runs
in roughly 10 minutes on 2 CPU cores (measured: 0.47-0.57 CPU-s per step for the tiny model with
most routers, ~165 CPU-s per run; ``--jobs 2``). Same data, data order and evaluation tokens for
every run; only ``train.seed`` varies across seeds.

* ``routers``: every router of the registry with its recommended balancing (:data:`RECOMMENDED`),
  3 seeds. Active-parameter tolerance 60%: StableMoE's token-embedding router and the recurrent
  router's GRU carry extra router parameters (stated in the table); the rest are within 2%.
* ``balancing``: top-k softmax with no balancing, the Switch aux loss, the sequence-level aux loss,
  the router z-loss, the auxiliary-loss-free bias, and the online k-means router -- the comparison
  of Ahrac, Hochwald & Geva 2026, "Routers Learn the Geometry of Their Experts" (arXiv:2605.12476).
* ``pool``: vanilla MoE vs UniPool at 100%, 66.7% and 50% of the expert budget (Huang et al. 2026,
  "UniPool"; ``layout.kind=shared_pool``, ``layout.pool_fraction``, NormRouter, pool-level loss).
  Active parameters are equal up to the routers (each UniPool router scores the whole pool).
* ``equifinality``: linear top-k vs cosine-routing variants vs hash vs random-fixed routing
  (Ternovtsii & Bilak 2026, "Equifinality in Mixture of Experts", arXiv:2604.14419: cosine variants
  equivalent within 1 PPL by TOST; hash/random lose 1.1-2.2 PPL), 3 seeds. The paper's cosine
  variants are its own ST-MoE family; ours vary the cosine router's routing-space size and initial
  temperature (a documented stand-in), at equal k and equal experts.
* ``dense-vs-moe``: a dense model vs MoE models at equal active parameters per token (8 experts
  top-2 of d_ff 256, 16 fine-grained experts top-4 of d_ff 128, 4 experts top-1 of d_ff 512, all
  matching one dense SwiGLU of d_ff 512), 3 seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moelab.errors import MoelabError, check_choice
from moelab.sweep.spec import SweepSpec

#: the reduced budget every preset shares (tiny model; see the README for measured times)
BUDGET: dict[str, Any] = {
    "train.steps": 300,
    "train.warmup_steps": 30,
    "train.eval_every": 100,
    "train.eval_max_batches": 8,
    "train.ckpt_every": 100,
    "train.keep_last": 1,
    "train.log_every": 50,
}

#: recommended balancing per router (overrides), as the routers' papers/docstrings say; others: Switch
RECOMMENDED: dict[str, dict[str, Any]] = {
    "softmax_topk": {"moe.aux_loss": "switch"},
    "sigmoid_topk": {"moe.aux_free_bias": True, "moe.aux_loss": "sequence", "moe.aux_loss_coef": 0.001},
    # balanced by construction (assignment / transport / expert choice / prices): no aux loss
    "base": {"moe.aux_loss": "none"},
    "bip": {"moe.aux_loss": "none"},
    "sinkhorn": {"moe.aux_loss": "none"},
    "expert_choice": {"moe.aux_loss": "none"},
    # nothing to balance by gradient (fixed or parameter-free routing, or a dense merge)
    "hash": {"moe.aux_loss": "none"},
    "random_fixed": {"moe.aux_loss": "none"},
    "kmeans": {"moe.aux_loss": "none"},
    "smear": {"moe.aux_loss": "none"},
    # the router owns its balancing (ReMoE's load-balanced L1; StableMoE's stage-1 balance loss)
    "relu": {"moe.aux_loss": "none"},
    # StableMoE's stage-1 balance loss is its own; its distilled router is a token-embedding table:
    # size it to the tiny preset's vocabulary (4096, not the 65536 default) and distil after a third
    "stablemoe": {"moe.aux_loss": "none", "moe.router_kwargs": {"vocab_size": 4096, "stage1_steps": 100}},
}
DEFAULT_BALANCING: dict[str, Any] = {"moe.aux_loss": "switch"}


def recommended_balancing(router: str) -> dict[str, Any]:
    return dict(RECOMMENDED.get(router, DEFAULT_BALANCING))


def routers_spec(seeds: list[int] | None = None) -> dict[str, Any]:
    from moelab.layers.routers import ROUTERS

    variants = [{"name": name, "moe.router": name, **recommended_balancing(name)} for name in ROUTERS.names()]
    # Router parameters differ: StableMoE's token-embedding router (a lookup, counted as active)
    # and the recurrent router's GRU add up to ~50% active parameters; the table states them all.
    return {"name": "routers", "preset": "tiny", "seeds": seeds or [0, 1, 2], "base": dict(BUDGET),
            "variants": variants, "fairness": {"active_param_tolerance": 0.6},
            "description": "every router of the registry with its recommended balancing, equal budget"}


def balancing_spec(seeds: list[int] | None = None) -> dict[str, Any]:
    none = {"moe.aux_loss": "none", "moe.aux_free_bias": False, "moe.z_loss_coef": 0.0}
    return {"name": "balancing", "preset": "tiny", "seeds": seeds or [0, 1, 2],
            "base": {**BUDGET, "moe.router": "softmax_topk"},
            "variants": [
                {"name": "no-balancing", **none},
                {"name": "switch-aux", **none, "moe.aux_loss": "switch", "moe.aux_loss_coef": 0.01},
                {"name": "sequence-aux", **none, "moe.aux_loss": "sequence", "moe.aux_loss_coef": 0.01},
                {"name": "z-loss", **none, "moe.z_loss_coef": 0.001},
                {"name": "aux-free-bias", **none, "moe.aux_free_bias": True, "moe.bias_update_rate": 0.001},
                {"name": "kmeans", **none, "moe.router": "kmeans"},
            ],
            "description": "balancing schemes for top-k softmax routing vs the online k-means router "
                           "(Routers Learn the Geometry of Their Experts)"}


def pool_spec(seeds: list[int] | None = None) -> dict[str, Any]:
    # UniPool: per-layer NormRouters over one shared pool, balanced by the pool-level loss (lagged)
    unipool = {"moe.router": "norm", "moe.aux_loss": "none", "layout.kind": "shared_pool",
               "layout.pool_loss_coef": 0.01, "layout.pool_loss_mode": "lagged"}
    return {"name": "pool", "preset": "tiny", "seeds": seeds or [0, 1, 2], "base": dict(BUDGET),
            "variants": [
                {"name": "vanilla", "moe.aux_loss": "switch"},
                {"name": "unipool-100", **unipool, "layout.pool_fraction": 1.0},
                {"name": "unipool-66.7", **unipool, "layout.pool_fraction": 2 / 3},
                {"name": "unipool-50", **unipool, "layout.pool_fraction": 0.5},
            ],
            "description": "vanilla per-layer MoE vs a UniPool shared expert pool at 100%, 66.7% and 50% of "
                           "the vanilla expert budget (Huang et al. 2026)"}


def equifinality_spec(seeds: list[int] | None = None) -> dict[str, Any]:
    return {"name": "equifinality", "preset": "tiny", "seeds": seeds or [0, 1, 2], "base": dict(BUDGET),
            "variants": [
                {"name": "linear-topk", "moe.router": "softmax_topk", "moe.aux_loss": "switch"},
                {"name": "cosine-d64", "moe.router": "cosine", "moe.aux_loss": "switch"},
                {"name": "cosine-d32", "moe.router": "cosine", "moe.aux_loss": "switch",
                 "moe.router_kwargs": {"d_space": 32}},
                {"name": "cosine-d16", "moe.router": "cosine", "moe.aux_loss": "switch",
                 "moe.router_kwargs": {"d_space": 16}},
                {"name": "cosine-t0.1", "moe.router": "cosine", "moe.aux_loss": "switch",
                 "moe.router_kwargs": {"init_temperature": 0.1}},
                {"name": "cosine-t1", "moe.router": "cosine", "moe.aux_loss": "switch",
                 "moe.router_kwargs": {"init_temperature": 1.0}},
                {"name": "hash", "moe.router": "hash", "moe.aux_loss": "none"},
                {"name": "random-fixed", "moe.router": "random_fixed", "moe.aux_loss": "none"},
            ],
            "description": "linear top-k vs cosine routing variants vs hash vs random-fixed (Equifinality)"}


def dense_vs_moe_spec(seeds: list[int] | None = None) -> dict[str, Any]:
    return {"name": "dense-vs-moe", "preset": "tiny", "seeds": seeds or [0, 1, 2], "base": dict(BUDGET),
            "variants": [
                {"name": "dense", "model.moe_layers": "none", "model.d_ff_dense": 512},
                {"name": "moe-8x256-top2", "moe.num_experts": 8, "moe.k": 2, "moe.d_ff": 256},
                {"name": "moe-16x128-top4", "moe.num_experts": 16, "moe.k": 4, "moe.d_ff": 128},
                {"name": "moe-4x512-top1", "moe.num_experts": 4, "moe.k": 1, "moe.d_ff": 512},
            ],
            "description": "a dense model vs MoE models at equal active parameters per token"}


SWEEP_PRESETS: dict[str, Callable[..., dict[str, Any]]] = {
    "routers": routers_spec,
    "balancing": balancing_spec,
    "pool": pool_spec,
    "equifinality": equifinality_spec,
    "dense-vs-moe": dense_vs_moe_spec,
}


def sweep_preset(name: str, seeds: list[int] | None = None) -> SweepSpec:
    """The :class:`SweepSpec` of preset ``name`` (``seeds`` replaces its default seeds)."""
    check_choice("sweep preset", name, SWEEP_PRESETS)
    return SweepSpec.from_dict(SWEEP_PRESETS[name](seeds))

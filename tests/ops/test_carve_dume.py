"""Carving (neuron clustering + distilled router) and DUME (closed-form ridge router over dense runs)."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models.config import ModelConfig
from moelab.models.moe_protocol import moe_layers
from moelab.models.transformer import MoETransformer
from moelab.ops.upcycle import UPCYCLE_CONFIGS, UPCYCLERS
from moelab.ops.upcycle.carve import _balanced_assign
from moelab.ops.upcycle.dume import DumeConfig, dume_runs, ridge_router
from moelab.train.run import load_config, load_run
from moelab.train.trainer import train

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_micro import write_corpus  # noqa: E402


def dense(d_ff=64, seed=0):
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff_dense=d_ff,
                                      moe_layers="none"))


def test_carve_with_all_experts_and_zero_router_is_the_dense_ffn():
    m = dense()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = m(ids).logits
    c = copy.deepcopy(m)
    UPCYCLERS.get("carve")(c, UPCYCLE_CONFIGS["carve"](num_experts=4, k=4, router_steps=0, router_init_std=0.0),
                           calibration=[ids])
    assert (c(ids).logits - ref).abs().max() <= 1e-5
    groups = moe_layers(c)[0].layer.carve_groups
    assert sorted(torch.cat(groups).tolist()) == list(range(64)) and {len(g) for g in groups} == {16}


def test_carve_router_predicts_the_clusters_better_than_chance():
    m = dense()
    ids = [torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    c = copy.deepcopy(m)
    UPCYCLERS.get("carve")(c, UPCYCLE_CONFIGS["carve"](num_experts=4, k=1, router_steps=150), calibration=ids)
    layer = moe_layers(c)[0].layer
    x = {}
    def keep(mod, a, o):
        x.setdefault("x", a[0].reshape(-1, 32))
    h = m.blocks[0].ffn.register_forward_hook(keep)
    m(ids[0])
    h.remove()
    w = m.blocks[0].ffn
    gate, up = w.w_gate_up.weight.chunk(2, dim=0)
    act = torch.nn.functional.silu(x["x"] @ gate.T) * (x["x"] @ up.T)
    best = torch.stack([act[:, g].norm(dim=1) for g in layer.carve_groups], 1).argmax(1)
    chosen = layer.router(x["x"]).expert_S
    assert float((chosen == best).float().mean()) > 0.5  # chance is 0.25


def test_balanced_assignment_oracle():
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    # greedy by similarity with room 2 each: rows 0, 1 take cluster 0; rows 2, 3 go to cluster 1
    assert _balanced_assign(sim, 2).tolist() == [0, 0, 1, 1]


def test_carve_bad_input():
    with pytest.raises(MoelabError, match="calibration"):
        UPCYCLERS.get("carve")(dense(), UPCYCLE_CONFIGS["carve"](num_experts=4))
    with pytest.raises(MoelabError, match="num_experts=5 must divide"):
        UPCYCLERS.get("carve")(dense(), UPCYCLE_CONFIGS["carve"](num_experts=5), calibration=[torch.zeros(1, 4).long()])


def test_ridge_router_matches_lstsq_oracle():
    X = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (50,))
    W = ridge_router(X, y, 3, 1e-3)
    Y = torch.nn.functional.one_hot(y, 3).double()
    Xa = torch.cat([X.double(), (1e-3 ** 0.5) * torch.eye(6, dtype=torch.float64)])  # ridge = augmented lstsq
    Ya = torch.cat([Y, torch.zeros(6, 3, dtype=torch.float64)])
    assert torch.allclose(W, torch.linalg.lstsq(Xa, Ya).solution, atol=1e-8)


@pytest.fixture
def domain_runs(micro_dense, tmp_path):
    """A base on both domains, then one continued run per domain (same tokenizer: bytes)."""
    base = tmp_path / "base"
    train(micro_dense(steps=4, ckpt_every=0), base, progress="off")
    src = tmp_path / "corpus"
    runs = []
    for dom in ("alpha", "beta"):
        only = tmp_path / f"only_{dom}"
        shutil.copytree(src / dom, only / dom)
        cfg = load_config(base)
        cfg.data.source, cfg.train.steps = str(only), 8
        train(cfg, tmp_path / dom, progress="off", init_from=base)
        runs.append(tmp_path / dom)
    return runs


def test_dume_router_recovers_the_domain_of_held_out_text(domain_runs, tmp_path):
    from moelab.cli.main import main

    out = tmp_path / "dume"
    assert main(["upcycle", "--method", "dume", *map(str, domain_runs), "--out", str(out)]) == 0
    run = load_run(out)
    assert [s.layer.cfg.num_experts for s in moe_layers(run.model)] == [2, 2]
    held = write_corpus(tmp_path / "held", docs_per_domain=2, words=40, seed=123)
    for label, dom in enumerate(("alpha", "beta")):
        text = (held / dom / "doc0.txt").read_text()
        ids = torch.tensor([run.tokenizer.encode(text)[:16]])
        run.model(ids)
        for s in moe_layers(run.model):
            chosen = s.layer.last_routing.expert_S
            assert float((chosen == label).float().mean()) >= 0.9, (dom, s.index)


def test_dume_bad_inputs(domain_runs, micro_dense, tmp_path):
    other = micro_dense(steps=1, ckpt_every=0)
    other.model.d_model, other.model.n_heads = 16, 2
    train(other, tmp_path / "other", progress="off")
    with pytest.raises(MoelabError, match="model.d_model"):
        dume_runs([domain_runs[0], tmp_path / "other"], DumeConfig(), tmp_path / "x")
    bpe = micro_dense(steps=1, ckpt_every=0)
    bpe.data.tokenizer, bpe.data.vocab_size = "bpe", 300
    bpe.model.vocab_size = 300
    train(bpe, tmp_path / "bpe", progress="off")
    with pytest.raises(MoelabError, match="architecture|tokenizer"):
        dume_runs([domain_runs[0], tmp_path / "bpe"], DumeConfig(), tmp_path / "y")
    with pytest.raises(MoelabError, match="number of runs"):
        dume_runs([domain_runs[0]], DumeConfig(), tmp_path / "z")
    with pytest.raises(MoelabError, match="k=3"):
        dume_runs(domain_runs, DumeConfig(k=3), tmp_path / "w")

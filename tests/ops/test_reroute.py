"""Test-time re-routing and steering: exact offsets, identities, routing-only changes, oracles."""

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.experts import expert_forward
from moelab.layers.moe import MoELayer
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer
from moelab.ops.reroute import REROUTE_METHODS
from moelab.ops.reroute.base import move_toward
from moelab.ops.reroute.c3po import C3PO, mean_shift
from moelab.ops.reroute.evaluate import score, table
from moelab.ops.reroute.offsets import gated_sites, logit_offsets
from moelab.ops.reroute.r2t2 import R2T2
from moelab.ops.reroute.rewire import Rewire
from moelab.ops.reroute.samples import Sample, continuation_loss, describe, neighbours, prompt_loss, successful
from moelab.ops.reroute.steer import Steer, derive_bias

V, L = 48, 12


def _model(router="softmax_topk", seed=0):
    torch.manual_seed(seed)
    m = MoETransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=2, d_ff_dense=64, max_seq_len=L,
                                   moe=MoEConfig(d_ff=32, num_experts=4, k=2, router=router)))
    return m.eval()


def _samples(n, seed, domain="a"):
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(0, V, (L,), generator=g), L // 2, domain) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    model = _model()
    refs = describe(model, _samples(12, 1) + _samples(12, 2, "b"))
    evals = describe(model, _samples(4, 3) + _samples(3, 4, "b"))
    return model, gated_sites(model, None, "test"), refs, evals


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.mlp = layer

    def forward(self, x):
        return self.mlp(x)


def test_offset_is_exactly_a_shift_of_the_gate_logits():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=8, num_experts=5, k=2))
    model = Wrap(layer).eval()
    x = torch.randn(7, 16)
    delta = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3])
    (site,) = gated_sites(model, None, "t")
    with torch.no_grad(), logit_offsets([site], {site.index: delta}):
        y = model(x)
    probs = torch.softmax(x @ layer.router.gate.weight_ED.T + delta, -1)  # dense oracle
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(7):
            for j in range(2):
                ref[t] += w[t, j] * expert_forward(layer.experts, x[t:t + 1], int(idx[t, j]))[0]
    assert torch.allclose(y, ref, atol=1e-5)
    # and the offset reaches the router's gradient path: d loss / d delta is non-zero
    d = delta.clone().requires_grad_(True)
    with logit_offsets([site], {site.index: d}):
        model(x).pow(2).sum().backward()
    assert d.grad is not None and d.grad.abs().sum() > 0


def test_move_toward_gives_the_mixture_exactly():
    p = torch.softmax(torch.randn(6), 0)
    t = torch.softmax(torch.randn(6), 0)
    for lam in (0.0, 0.3, 1.0):
        got = torch.softmax(torch.log(p) + move_toward(p, t, lam), 0)
        assert torch.allclose(got, (1 - lam) * p + lam * t, atol=1e-6)
    mask = torch.tensor([1.0, 1, 0, 0, 0, 0])
    assert torch.all(move_toward(p, t, 0.5, mask)[2:] == 0)


@pytest.mark.parametrize("method", [R2T2(lam=0.0), R2T2(strategy="ngd", steps=0), C3PO(lam=0.0),
                                    C3PO(surrogate="ngd", steps=0), Rewire(steps=0), Steer(strength=0.0)])
def test_zero_step_or_zero_strength_is_the_identity(setup, method):
    model, sites, refs, evals = setup
    base = score(model, sites, evals, "base")
    got = score(model, sites, evals, "m", method, successful(refs, 0.5))
    assert got.losses == base.losses  # bit-identical


def test_every_method_changes_only_routing_and_is_deterministic(setup):
    model, sites, refs, evals = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = successful(refs, 0.5)
    methods = [R2T2(strategy=s, neighbours=3) for s in ("knn", "kernel", "ngd")] + \
              [C3PO(surrogate=s, neighbours=3) for s in ("mode", "kernel", "ngd")] + [Rewire(steps=3), Steer()]
    first = [score(model, sites, evals, type(m).__name__, m, good) for m in methods]
    again = [score(model, sites, evals, type(m).__name__, m, good) for m in methods]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [r.losses for r in first] == [r.losses for r in again]
    base = score(model, sites, evals, "base")
    assert any(r.losses != base.losses for r in first)
    assert "extra fwd tokens" in table([base, *first], target="a")


def test_rewire_lowers_the_prompt_loss_it_optimises(setup):
    model, sites, _, evals = setup
    x = evals[0]
    a = Rewire(steps=10, lr=0.1).adapt(model, sites, x, None)
    with torch.no_grad():
        before = float(prompt_loss(model, x))
        with logit_offsets(sites, a.deltas):
            after = float(prompt_loss(model, x))
    assert after < before
    assert a.extra_tokens == 3 * 10 * x.prompt_len


def test_ngd_lowers_the_neighbours_mean_loss(setup):
    model, sites, refs, evals = setup
    good = successful(refs, 0.5)
    x = evals[0]
    nbrs, _ = neighbours(x, good, 3)
    a = R2T2(strategy="ngd", neighbours=3, steps=8, lr=0.2).adapt(model, sites, x, good)
    with torch.no_grad():
        before = sum(float(continuation_loss(model, n)) for n in nbrs)
        with logit_offsets(sites, a.deltas):
            after = sum(float(continuation_loss(model, n)) for n in nbrs)
    assert after < before


def test_c3po_touches_only_core_experts_of_critical_layers(setup):
    model, sites, refs, evals = setup
    a = C3PO(core=1, critical_fraction=0.3, neighbours=3, lam=1.0).adapt(model, sites, evals[0], refs)
    assert list(a.deltas) == [sites[-1].index]  # ceil(0.3 * 3) = 1 critical layer: the last
    assert int((a.deltas[sites[-1].index] != 0).sum()) <= 1


def test_neighbours_and_success_filter():
    refs = [Sample(torch.zeros(4, dtype=torch.long), 2, "a", embedding_D=torch.tensor(e), loss=l)
            for e, l in (([1.0, 0.0], 1.0), ([0.0, 1.0], 2.0), ([0.9, 0.1], 3.0), ([-1.0, 0.0], 4.0))]
    x = Sample(torch.zeros(4, dtype=torch.long), 2, "a", embedding_D=torch.tensor([1.0, 0.05]))
    got, _ = neighbours(x, refs, 2)
    assert [r.loss for r in got] == [1.0, 3.0]
    assert [r.loss for r in successful(refs, 0.5)] == [1.0, 2.0]
    with pytest.raises(MoelabError, match="neighbours=5"):
        neighbours(x, refs, 5)


def test_mean_shift_finds_the_nearer_mode():
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    mode = mean_shift(torch.tensor([0.5, 0.5]), pts)
    assert mode.norm() < 0.2


def test_steering_bias_hand_computed(setup):
    _, sites, _, _ = setup
    s0 = Sample(torch.zeros(2, dtype=torch.long), 1, "a", pathway={i.index: torch.tensor([0.1, 0.5, 0.3, 0.1])
                                                                   for i in sites})
    s1 = Sample(torch.zeros(2, dtype=torch.long), 1, "a", pathway={i.index: torch.tensor([0.4, 0.2, 0.3, 0.1])
                                                                   for i in sites})
    bias = derive_bias([s0, s1], sites[:1], top=2, strength=1.5)  # means: .25 .35 .30 .10
    assert torch.equal(bias[sites[0].index], torch.tensor([0.0, 1.5, 1.5, 0.0]))


def test_bad_input_is_refused_clearly():
    with pytest.raises(MoelabError, match="dense model"):
        gated_sites(MoETransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff_dense=64,
                                               moe_layers="none")), None, "c3po")
    with pytest.raises(MoelabError, match=r"layers=\[7\]"):
        gated_sites(_model(), [7], "steer")
    with pytest.raises(MoelabError, match="no gate"):
        gated_sites(_model("hash"), None, "rewire")
    with pytest.raises(MoelabError, match="strategy"):
        R2T2(strategy="nope")
    with pytest.raises(MoelabError, match="re-routing method"):
        REROUTE_METHODS.get("nope")


def test_reroute_and_steer_commands_on_a_trained_run(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from train_micro import micro_config  # noqa: E402

    from moelab.cli.main import main
    from moelab.train.trainer import train

    run = tmp_path / "run"
    train(micro_config(tmp_path, steps=6), run, progress="off")
    out = tmp_path / "out"
    assert main(["reroute", str(run), "--limit", "3", "--neighbours", "2", "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    for name in ("unmodified", "r2t2", "c3po", "rewire"):
        assert name in text
    doc = json.loads((out / "reroute.json").read_text())
    assert [r["method"] for r in doc["results"]] == ["unmodified", "r2t2", "c3po", "rewire"]
    assert doc["results"][0]["extra_tokens_per_token"] == 0.0 < doc["results"][3]["extra_tokens_per_token"]
    domain = sorted(doc["results"][0]["per_domain"])[0]
    assert main(["steer", str(run), "--toward", domain, "--strength", "0", "--limit", "3", "--no-progress",
                 "--out", str(out)]) == 0
    steer = json.loads((out / "steer.json").read_text())["results"]
    assert steer[0]["per_domain"] == steer[1]["per_domain"]  # strength 0: the identity
    assert main(["reroute", str(run), "--method", "nope", "--no-progress"]) == 2
    assert main(["reroute", str(run), "--neighbours", "999", "--limit", "2", "--no-progress"]) == 2
    assert "neighbours=999" in capsys.readouterr().err

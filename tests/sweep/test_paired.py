"""Paired designs: common random numbers, the paired analysis, power, and adding seeds."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from moelab.errors import MoelabError
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer
from moelab.layers.config import MoEConfig
from moelab.sweep.adaptive import next_seed_count, undecided
from moelab.sweep.crn import apply_common_init, build_reference, param_owners
from moelab.sweep.leaderboard import build_leaderboard
from moelab.sweep.stats import compare, paired_compare, seeds_needed, signed_rank_p

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_leaderboard import fake_sweep  # noqa: E402


def test_paired_compare_matches_scipy_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.3, 6)
    b = a + 0.05 + rng.normal(0, 0.01, 6)
    c = paired_compare(a, b, margin=0.2)
    ref = st.ttest_rel(a, b)
    assert c.p_difference == pytest.approx(ref.pvalue, rel=1e-9)
    d = a - b
    half = st.t.ppf(0.95, 5) * d.std(ddof=1) / math.sqrt(6)
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    # TOST: the two one-sided paired t-tests against ±margin
    p_lo = st.ttest_1samp(d, -0.2, alternative="greater").pvalue
    p_hi = st.ttest_1samp(d, 0.2, alternative="less").pvalue
    assert c.p_equivalence == pytest.approx(max(p_lo, p_hi), rel=1e-9)
    assert signed_rank_p(a, b) == pytest.approx(st.wilcoxon(d).pvalue)


def test_paired_design_finds_a_known_effect_with_fewer_seeds_than_unpaired():
    """Seed noise shared by both configurations (sd 0.5) dwarfs the effect (0.1); pairing removes it."""
    rng = np.random.default_rng(1)
    found = {"paired": [], "unpaired": []}
    for _ in range(200):
        seed_effect = rng.normal(0, 0.5, 4)
        a = 3.0 + seed_effect + rng.normal(0, 0.02, 4)
        b = 3.1 + seed_effect + rng.normal(0, 0.02, 4)
        found["paired"].append(paired_compare(a, b, margin=0.05).different)
        found["unpaired"].append(compare(a, b, margin=0.05).different)
    assert np.mean(found["paired"]) > 0.9 > 0.2 > np.mean(found["unpaired"])


@pytest.mark.parametrize("diff,sd,margin", [(0.3, 0.5, 2.0), (1.0, 1.0, 0.2), (0.0, 1.0, 0.8)])
def test_seeds_needed_gives_the_promised_power_on_simulated_normals(diff, sd, margin):
    n = seeds_needed(diff, sd, margin=margin)
    assert n is not None and n >= 2
    rng = np.random.default_rng(2)

    def decided(m):
        d = rng.normal(diff, sd, (4000, m))
        mean, se = d.mean(1), d.std(1, ddof=1) / math.sqrt(m)
        t_two, t_one = st.t.ppf(0.975, m - 1), st.t.ppf(0.95, m - 1)
        different = np.abs(mean) / se > t_two
        equivalent = (mean - t_one * se > -margin) & (mean + t_one * se < margin)
        return (different | equivalent).mean()

    assert decided(n) >= 0.77  # 80% power, Monte-Carlo slack
    if n > 2:
        assert decided(n - 1) < decided(n) + 0.02


def test_seeds_needed_edge_cases():
    assert seeds_needed(0.1, 0.0, margin=1.0) == 2
    assert seeds_needed(1.0, 1.0, margin=1.0, max_n=50) is not None  # difference still reachable
    with pytest.raises(MoelabError, match="sd"):
        seeds_needed(0.1, -1.0, margin=1.0)


def _cfg(**moe):
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff_dense=64,
                       moe=MoEConfig(d_ff=32, num_experts=4, k=2, **moe))


def test_common_init_shares_every_matching_tensor_and_nothing_else():
    ref = build_reference(_cfg(), seed=3)
    torch.manual_seed(123)
    other = MoETransformer(_cfg(router="cosine"))  # router differs: its parameters must keep their own init
    state = {k: v.clone() for k, v in other.state_dict().items()}
    copied = apply_common_init(other, ref.state_dict(), param_owners(ref))
    ref_sd, new_sd = ref.state_dict(), other.state_dict()
    assert "embed.weight" in copied and any(".attn." in n for n in copied) and any(".experts." in n for n in copied)
    for name in new_sd:
        if name in copied:
            assert torch.equal(new_sd[name], ref_sd[name])
        else:
            assert torch.equal(new_sd[name], state[name]), name
    assert not any(".router." in n for n in copied)  # another router class: not copied
    # without the copy the two configurations would not share the embeddings
    torch.manual_seed(3)
    plain = MoETransformer(_cfg(router="cosine"))
    assert not torch.equal(plain.embed.weight, ref.embed.weight)


def test_reference_build_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_reference(_cfg(), seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_leaderboard_pairs_by_seed_and_narrows_the_interval(tmp_path):
    seed_noise = [0.0, 0.4, -0.3, 0.2]
    groups = {"a": [3.0 + s for s in seed_noise], "b": [3.05 + s + 0.002 * i for i, s in enumerate(seed_noise)]}
    sweep = fake_sweep(tmp_path / "s", groups)
    lb = build_leaderboard(sweep, metric="val_loss", margin=0.01)
    (pair,) = lb.pairs
    assert pair.design == "paired" and pair.n == 4
    paired_w = pair.comparison.ci_high - pair.comparison.ci_low
    unpaired_w = pair.unpaired.ci_high - pair.unpaired.ci_low
    assert paired_w * 20 < unpaired_w
    assert pair.verdict.startswith("a is better")
    lb_u = build_leaderboard(sweep, metric="val_loss", margin=0.01, paired=False)
    assert lb_u.pairs[0].design == "unpaired" and lb_u.pairs[0].verdict == "inconclusive"
    assert "paired" in lb.to_markdown() and json.dumps(pair.to_dict())


def test_until_conclusive_asks_for_more_seeds_only_while_undecided(tmp_path):
    lb = build_leaderboard(fake_sweep(tmp_path / "u", {"a": [3.0, 3.4], "b": [3.1, 3.2]}), metric="val_loss",
                           margin=0.01, paired=True)
    assert undecided(lb)
    n = next_seed_count(lb, 2, 6)
    assert 3 <= n <= 6
    lb2 = build_leaderboard(fake_sweep(tmp_path / "d", {"a": [3.0, 3.1, 3.2], "b": [3.5, 3.6, 3.7]}),
                            metric="val_loss", margin=0.01)
    assert not undecided(lb2) and next_seed_count(lb2, 3, 6) == 3


def test_other_metrics_decide_in_their_direction(tmp_path):
    sweep = fake_sweep(tmp_path / "m", {"a": [3.0, 3.0, 3.0], "b": [3.0, 3.0, 3.0]},
                       a={"tps": 200.0}, b={"tps": 100.0})
    lb = build_leaderboard(sweep, metric="tokens_per_s", margin=1.0)
    assert lb.groups[0].group == "a"  # higher is better
    assert lb.pairs[0].verdict == "a is better"


def test_sweep_workers_start_from_the_common_initial_weights(micro, tmp_path):
    """Two routers, one seed, zero training steps: the second run's shared tensors equal the first's."""
    from moelab.sweep.runner import plan_sweep, run_sweep, write_plan
    from moelab.sweep.spec import SweepSpec
    from moelab.train import checkpoint as ckpt

    base = micro(steps=1, ckpt_every=1)
    base["train.lr"] = 1e-12  # the one step changes nothing visible: the checkpoint holds the initial weights
    base["train.warmup_steps"] = 0
    spec = SweepSpec.from_dict({"name": "crn", "seeds": [4], "base": base,
                                "axes": {"moe.router": ["softmax_topk", "cosine"]},
                                "fairness": {"allow_unfair": True}})
    result = run_sweep(spec, tmp_path / "sw", progress="off", poll_s=0.05)
    assert result.ok, result.failed
    a, b = plan_sweep(spec, tmp_path / "sw").runs
    sd_a, _, _ = ckpt.read_checkpoint(ckpt.find_checkpoint(a.run_dir / "checkpoints", None), with_optimizer=False)
    sd_b, _, _ = ckpt.read_checkpoint(ckpt.find_checkpoint(b.run_dir / "checkpoints", None), with_optimizer=False)
    def same(x, y):
        return torch.allclose(x, y, rtol=0, atol=1e-9)

    assert same(sd_a["embed.weight"], sd_b["embed.weight"])
    shared_attn = [n for n in sd_a if ".attn." in n]
    assert shared_attn and all(same(sd_a[n], sd_b[n]) for n in shared_attn)
    assert "crn_shared_tensors" in b.log_path.read_text()
    no_crn = SweepSpec.from_dict({**spec.to_dict(), "name": "plain", "common_init": False})
    assert run_sweep(no_crn, tmp_path / "sw2", progress="off", poll_s=0.05).ok
    c = plan_sweep(no_crn, tmp_path / "sw2").runs[1]
    sd_c, _, _ = ckpt.read_checkpoint(ckpt.find_checkpoint(c.run_dir / "checkpoints", None), with_optimizer=False)
    assert (sd_a["embed.weight"] - sd_c["embed.weight"]).abs().max() > 1e-3


def test_bootstrap_se_matches_the_analytic_standard_error_of_a_mean():
    from moelab.train.evalnoise import bootstrap_se

    rng = np.random.default_rng(3)
    per_window = rng.normal(3.0, 0.4, 400)
    se = bootstrap_se(per_window * 10, np.full(400, 10), n_boot=4000)
    assert se == pytest.approx(per_window.std(ddof=1) / math.sqrt(400), rel=0.08)
    assert math.isnan(bootstrap_se([1.0], [4]))
    # token weighting: a window with no tokens is ignored
    assert bootstrap_se([1.0, 2.0, 99.0], [1, 1, 0]) == pytest.approx(bootstrap_se([1.0, 2.0], [1, 1]))


def _windows(loss_W, tokens=10):
    return [float(x) * tokens for x in loss_W], [tokens] * len(loss_W)


def test_paired_eval_se_is_the_noise_of_the_per_window_differences_only():
    """Window difficulty common to both runs cancels; what remains is sd(mean per-window difference)/sqrt(W)."""
    from moelab.train.evalnoise import bootstrap_se, paired_bootstrap_se

    rng = np.random.default_rng(5)
    W = 500
    hard_W = rng.normal(4.0, 0.8, W)  # the windows' common difficulty: a large per-run SE
    d_SW = rng.normal(0.03, 0.05, (2, W))  # two seeds' per-window effects
    a = [_windows(hard_W + d_SW[s]) for s in range(2)]
    b = [_windows(hard_W) for _ in range(2)]
    se = paired_bootstrap_se(a, b, n_boot=4000)
    assert se == pytest.approx(d_SW.mean(0).std(ddof=1) / math.sqrt(W), rel=0.1)
    assert bootstrap_se(*a[0]) > 10 * se  # one run's SE is dominated by the common difficulty
    shifted = [_windows(hard_W + 0.05) for _ in range(2)]
    assert paired_bootstrap_se(shifted, b) < 1e-9  # a constant shift has no evaluation noise
    assert math.isnan(paired_bootstrap_se(a, b[:1]))  # unpaired seeds
    assert math.isnan(paired_bootstrap_se([_windows(hard_W[:10])], [_windows(hard_W[:11])]))  # other windows


def test_leaderboard_reports_the_eval_se_of_each_paired_difference(tmp_path):
    from moelab.train.evalnoise import paired_bootstrap_se

    rng = np.random.default_rng(6)
    hard = rng.normal(4.0, 0.5, 200)
    d = rng.normal(0.02, 0.1, (3, 200))
    root = fake_sweep(tmp_path, {"a": [4.0, 4.01, 3.99], "b": [4.02, 4.03, 4.0]})
    for s in range(3):
        for g, loss in (("a", hard), ("b", hard + d[s])):
            run = root / "runs" / f"{g}__seed{s}"
            summ = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summ, "eval_step": 10}))
            nll, tok = _windows(loss)
            (run / "eval_windows.json").write_text(json.dumps({"step": 10, "nll": nll, "tokens": tok}))
    pair = build_leaderboard(root, metric="val_loss", margin=0.01, baseline="a").pairs[0]
    assert (pair.a, pair.b) == ("b", "a")
    assert pair.eval_se == pytest.approx(d.mean(0).std(ddof=1) / math.sqrt(200), rel=0.15)
    assert pair.eval_se == pytest.approx(paired_bootstrap_se([_windows(hard + d[s]) for s in range(3)],
                                                             [_windows(hard)] * 3))
    # a per-window record of another evaluation step than the summary's is not used
    (root / "runs" / "b__seed1" / "eval_windows.json").write_text(json.dumps({"step": 5, "nll": nll, "tokens": tok}))
    assert build_leaderboard(root, metric="val_loss", margin=0.01, baseline="a").pairs[0].eval_se is None

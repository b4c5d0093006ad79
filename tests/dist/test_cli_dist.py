"""`moelab ep-plan` and `moelab offload-sim` on the routing trace of a tiny real run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_micro import micro_config  # noqa: E402

from moelab.cli.main import main  # noqa: E402
from moelab.dist.offload import ExpertCache, simulate  # noqa: E402
from moelab.train.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traced")
    cfg = micro_config(tmp, steps=4)
    cfg.model.moe.num_experts, cfg.model.moe.k = 8, 2
    train(cfg, tmp / "run", progress="off")
    assert main(["analyze", str(tmp / "run"), "--max-traces", "1", "--windows", "8"]) == 0
    return tmp / "run"


def test_ep_plan_table_and_json(traced_run, capsys, tmp_path):
    assert main(["ep-plan", str(traced_run), "--ranks", "2", "4", "8", "--redundant", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {(r["ranks"], r["method"]): r for r in rows}
    assert by[(8, "eplb")]["imbalance"] <= by[(8, "plain")]["imbalance"] + 1e-9
    # plain EP bytes: 2 * kbar * D * 2 bytes * (1 - 1/R); k=2 dropless so kbar = 2, D = 32
    assert by[(4, "plain")]["bytes_per_token"] == pytest.approx(2 * 2 * 32 * 2 * 0.75)
    assert main(["ep-plan", str(traced_run), "--ranks", "4", "--method", "llep", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "llep" in capsys.readouterr().out


def test_offload_sim_cli(traced_run, capsys):
    assert main(["offload-sim", str(traced_run), "--cache-experts", "8", "--predict", "expertflow", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["lru"]["hit_rate"] <= 1.0 and 0.0 <= out["segment"]["sch"] <= 1.0
    assert out["lru"]["prefetch_precision"] is not None


class _Trace:
    """A hand-made trace: 2 layers, one sequence per half, fixed expert sets."""

    def __init__(self, sets0, sets1, E=4):
        from moelab.analysis.trace import LayerTrace

        T = len(sets0)
        self.num_tokens = T
        self.valid_T = np.ones(T, bool)
        self.seq_T = np.array([0] * (T // 2) + [1] * (T - T // 2))
        self.pos_T = np.arange(T) % (T // 2)
        self.layers = []
        for li, sets in enumerate((sets0, sets1)):
            tok = np.array([t for t, s in enumerate(sets) for _ in s])
            exp = np.array([e for s in sets for e in s])
            self.layers.append(LayerTrace(li, E, tok, exp, np.ones(tok.size, np.float32)))


def test_cache_policies_against_hand_counts():
    # replayed half: tokens use layer0 {0} then {1}, {0}, {1}; layer1 {2} always
    t = _Trace([[3]] * 4 + [[0], [1], [0], [1]], [[3]] * 4 + [[2]] * 4)
    # 2 slots, accesses (0,0) (1,2) (0,1) (1,2) (0,0) (1,2) (0,1) (1,2): every layer-0 access misses
    # (it evicts the other layer-0 expert), (1,2) misses once and then hits 3 times
    r = simulate(t, 2, policy="lru")
    assert r.demands == 8 and r.hit_rate == pytest.approx(3 / 8)
    r3 = simulate(t, 3, policy="lru")
    assert r3.hit_rate == pytest.approx(5 / 8)  # 3 cold misses, then everything fits
    c = ExpertCache(2, "lfu")
    for k in [(0, 0), (0, 0), (0, 1)]:
        c.insert(k)
        c.touch(k)
    c.insert((0, 2))  # evicts (0, 1): used once
    assert (0, 0) in c and (0, 1) not in c


def test_expertflow_prefetch_learns_the_path():
    # layer-0 expert e is always followed by layer-1 expert e + 2 (fit half == replay half)
    sets0 = [[0], [1], [0], [1]] * 2
    t = _Trace(sets0, [[s[0] + 2] for s in sets0])
    plain = simulate(t, 2, policy="lru")
    pref = simulate(t, 2, policy="lru", predict="expertflow")
    assert pref.prefetch_precision == pytest.approx(1.0)
    assert pref.hit_rate > plain.hit_rate

"""Sweep presets, the progress display and the command line."""

import io
import json
from types import SimpleNamespace

import pytest

from moelab.cli.main import main
from moelab.errors import MoelabError
from moelab.sweep.fairness import check_fairness
from moelab.sweep.presets import BUDGET, SWEEP_PRESETS, sweep_preset
from moelab.sweep.progress import SweepProgress
from moelab.sweep.runner import build_run_config, count_parameters


@pytest.mark.parametrize("name", ["balancing", "equifinality", "dense-vs-moe"])
def test_presets_are_valid_and_fair(name):
    spec = sweep_preset(name, seeds=[0])
    runs = spec.expand()
    assert len({r.group for r in runs}) == len(runs) >= 4
    params = {}
    rows = []
    for r in runs:
        cfg = build_run_config(spec, r)
        assert cfg.train.steps == BUDGET["train.steps"] and cfg.data.source == "embedded"
        params.setdefault(r.group, count_parameters(cfg)[1])
        rows.append((r.name, r.group, cfg.to_dict(), params[r.group]))
    report = check_fairness(rows, tolerance=spec.fairness_setting("active_param_tolerance"))
    assert report.fair, report.issues


def test_balancing_preset_compares_the_papers_schemes():
    groups = {r.group: r.overrides for r in sweep_preset("balancing").expand() if r.seed == 0}
    assert set(groups) == {"no-balancing", "switch-aux", "sequence-aux", "z-loss", "aux-free-bias", "kmeans"}
    assert groups["kmeans"]["moe.router"] == "kmeans" and groups["no-balancing"]["moe.aux_loss"] == "none"
    assert groups["aux-free-bias"]["moe.aux_free_bias"] is True
    assert sweep_preset("balancing").seeds == [0, 1, 2]


def test_routers_preset_has_every_router():
    from moelab.layers.routers import ROUTERS

    spec = sweep_preset("routers")
    assert {r.group for r in spec.expand()} == set(ROUTERS.names()) and spec.seeds == [0, 1, 2]


def test_pool_preset_builds_unipool_runs_from_the_layout_keys():
    from moelab.sweep.runner import build_run_config

    spec = sweep_preset("pool")
    runs = {r.group: build_run_config(spec, r) for r in spec.expand() if r.seed == 0}
    assert set(runs) == {"vanilla", "unipool-100", "unipool-66.7", "unipool-50"}
    assert runs["vanilla"].model.layout.kind == "per_layer"
    assert [runs[g].model.layout.pool_fraction for g in ("unipool-100", "unipool-66.7", "unipool-50")] == [1.0, 2 / 3, 0.5]
    assert runs["unipool-50"].model.layout.kind == "shared_pool" and runs["unipool-50"].model.moe.router == "norm"
    with pytest.raises(MoelabError, match="choose one of"):
        sweep_preset("nope")
    assert set(SWEEP_PRESETS) == {"routers", "balancing", "pool", "equifinality", "dense-vs-moe"}


def test_progress_counts_runs_and_estimates_eta():
    runs = [SimpleNamespace(name=f"r{i}", steps=100, state=s, step=st)
            for i, (s, st) in enumerate([("done", 100), ("partial", 40), ("new", 0)])]
    out = io.StringIO()
    bar = SweepProgress(SimpleNamespace(runs=runs), mode="log", stream=out, log_every_s=0, jobs=2)
    assert bar.n_done == 1 and bar.steps_left() == 160 and bar.eta_s() is None
    bar._last_update -= 10.0  # one worker trained for 10 s: 20 steps -> 2 steps per worker-second
    bar.update([(runs[1], 60)])
    assert bar.steps_trained() == 20 and bar.worker_s == pytest.approx(10, rel=0.01)
    # 140 steps left over 2 unfinished runs on 2 workers: 140 / (2 * 2) = 35 s
    assert bar.eta_s() == pytest.approx(35, rel=0.01)
    bar.steps_of["r2"] = 0  # one unfinished run left (40 steps): it runs alone
    assert bar.eta_s() == pytest.approx(40 / 2, rel=0.01)
    bar.finished(runs[1], ok=True)
    assert "2/3 runs done" in bar.status([]) and "(2/3 done" in out.getvalue()
    assert "r1 60/100" in out.getvalue()


def test_cli_list_dry_run_and_errors(tmp_path, capsys, micro):
    assert main(["sweep", "--list"]) == 0
    assert "balancing" in capsys.readouterr().out
    spec = tmp_path / "s.toml"
    base = "\n".join(f'"{k}" = {json.dumps(v)}' for k, v in micro().items())
    spec.write_text(f'seeds = [0, 1]\n[base]\n{base}\n[axes]\n"moe.router" = ["softmax_topk", "kmeans"]\n')
    assert main(["sweep", str(spec), "--dry-run", "--out", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "router=kmeans__seed1" in out and "fair" in out
    assert main(["sweep", str(spec), "--dry-run", "--set", "moe.k=1", "--seeds", "3"]) == 0
    assert "__seed3" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes:\n  moe.router: [softmax_topk, nope]\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["sweep", "no-such-preset"]) == 2
    assert "neither a spec file" in capsys.readouterr().err
    assert main(["sweep", str(spec), "--seeds", "x"]) == 2
    assert main(["sweep-report", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_progress_bar_redraws_one_line():
    runs = [SimpleNamespace(name="r0", steps=10, state="new", step=0)]
    out = io.StringIO()
    bar = SweepProgress(SimpleNamespace(runs=runs), mode="bar", stream=out)
    bar.update([(runs[0], 3)])
    bar.update([(runs[0], 4)])
    bar.message("hello")
    bar.close()
    text = out.getvalue()
    assert text.count("\r[sweep] 0/1 runs done | running: r0 ") == 2 and "r0 4/10" in text and "\nhello\n" not in text
    assert "hello\n" in text and text.endswith("hello\n")

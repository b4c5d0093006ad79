"""Run-level upcycling: `moelab upcycle` writes a loadable run at step 0; `moelab train --init-from` continues
it with a fresh optimizer, saves, resumes exactly, and `moelab analyze` reads it."""

from __future__ import annotations

import json

import pytest
import torch

from moelab.cli.main import main
from moelab.errors import MoelabError
from moelab.models.moe_protocol import moe_layers
from moelab.train.metrics import read_jsonl
from moelab.train.run import load_config, load_run
from moelab.train.trainer import train


@pytest.fixture
def dense_run(micro_dense, tmp_path):
    run = tmp_path / "dense"
    train(micro_dense(steps=6, ckpt_every=0), run, progress="off")
    return run


def test_upcycle_cli_writes_a_loadable_equivalent_run(dense_run, tmp_path):
    out = tmp_path / "up"
    assert main(["upcycle", str(dense_run), "--method", "sparse", "--num-experts", "4", "--k", "2",
                 "--out", str(out)]) == 0
    src, up = load_run(dense_run), load_run(out)
    assert up.step == 0 and [s.index for s in moe_layers(up.model)] == [0, 1]
    ids = torch.randint(0, 200, (2, 12))
    assert (up.model(ids).logits - src.model(ids).logits).abs().max() <= 1e-5
    record = json.loads((out / "upcycle.json").read_text())
    assert record["method"] == "sparse" and record["options"]["num_experts"] == 4


def test_init_from_continues_saves_and_resumes_exactly(dense_run, tmp_path):
    out = tmp_path / "up"
    assert main(["upcycle", str(dense_run), "--method", "granular", "--num-experts", "4", "--k", "2",
                 "--granularity", "2", "--out", str(out)]) == 0
    cfg = load_config(out)
    cfg.train.steps, cfg.train.ckpt_every = 6, 3
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, progress="off", init_from=out)
    train(cfg, part, progress="off", init_from=out, until_step=3)
    train(load_config(part), part, progress="off", resume=True)
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert json.loads((full / "init_from.json").read_text())["step"] == 0
    # the first step starts from the upcycled (= dense) weights: loss close to the dense run's last loss
    dense_last = read_jsonl(dense_run / "metrics.jsonl")[-1]["lm_loss"]
    assert a[0]["lm_loss"] < dense_last + 0.5
    assert main(["analyze", str(full), "--max-traces", "1", "--windows", "2"]) == 0
    assert (full / "analysis" / "analysis.json").is_file()


def test_grow_run_and_bad_inputs(dense_run, tmp_path):
    out, grown = tmp_path / "up", tmp_path / "grown"
    main(["upcycle", str(dense_run), "--method", "sparse", "--num-experts", "2", "--k", "2", "--out", str(out)])
    assert main(["upcycle", str(out), "--method", "grow", "--factor", "2", "--mode", "phased", "--utility",
                 "--out", str(grown)]) == 0
    assert load_run(grown).config.model.moe.num_experts == 4
    with pytest.raises(MoelabError, match="no options"):
        from moelab.ops.upcycle.runs import make_options
        make_options("grow", k=3)
    assert main(["upcycle", str(out), "--method", "sparse", "--out", str(tmp_path / "x")]) == 2  # already MoE
    assert main(["upcycle", str(dense_run), "--method", "carve", "--num-experts", "4", "--k", "2",
                 "--out", str(tmp_path / "carved")]) == 0
    assert load_run(tmp_path / "carved").config.model.moe.d_ff == 16
    assert main(["upcycle", str(dense_run), str(out), "--method", "sparse", "--out", str(tmp_path / "y")]) == 2
    cfg = load_config(grown)
    cfg.model.moe.num_experts = 8  # does not fit the weights
    with pytest.raises(MoelabError, match="do not fit"):
        train(cfg, tmp_path / "bad", progress="off", init_from=grown)

"""`moelab train --init-from IMPORTED_RUN --train.only routers`: swapped routers are trained, nothing else."""

from __future__ import annotations

import json

import torch

from moelab.models.moe_protocol import moe_layers


def test_router_only_training_of_an_imported_model(hf_folders, tiny_corpus, tmp_path):
    from moelab.cli.main import main
    from moelab.hf import import_to_run
    from moelab.train.run import load_run

    src = import_to_run(hf_folders["olmoe"][0], tmp_path / "src", seq_len=16, data_source=str(tiny_corpus),
                        swap_router="sigmoid_topk")
    out = tmp_path / "tuned"
    rc = main(["train", "--init-from", str(src), "--run-dir", str(out), "--progress", "off",
               "--train.steps", "2", "--train.batch_size", "2", "--train.warmup_steps", "0", "--train.lr", "0.05",
               "--train.only", "routers", "--train.eval_max_batches", "1"])
    assert rc == 0
    before, after = load_run(src).model, load_run(out).model
    assert json.loads((out / "config.json").read_text())["hf"]["layers"]["0"]["moe"]["router"] == "sigmoid_topk"
    a, b = before.state_dict(), after.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".moe.router." in k for k in changed)
    assert [s.layer.cfg.router for s in moe_layers(after)] == ["sigmoid_topk", "sigmoid_topk"]

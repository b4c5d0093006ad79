"""`moelab finetune`: adapters trained on a frozen dense run, saved apart from the base, merge folds a LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from moelab.cli.main import main
from moelab.ops.lora import load_adapters
from moelab.train.run import load_run
from moelab.train.trainer import train


@pytest.fixture
def dense_run(micro_dense, tmp_path):
    run = tmp_path / "dense"
    train(micro_dense(steps=4, ckpt_every=0), run, progress="off")
    return run


def test_finetune_lora_learns_saves_and_merges(dense_run, tmp_path):
    out = tmp_path / "ft"
    before = {k: v.clone() for k, v in load_run(dense_run).model.state_dict().items()}
    assert main(["finetune", str(dense_run), "--adapter", "lora", "--rank", "4", "--out", str(out), "--merge",
                 "--train.steps", "12", "--train.lr", "0.01", "--progress", "off"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["val_after"]["val_loss"] < s["val_before"]["val_loss"]
    assert s["trainable_params"] == 2 * 3 * 4 * (32 + 64)  # 2 blocks x 3 projections x r (I + O)
    base = load_run(dense_run)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())  # base run untouched
    adapted = load_adapters(base.model, out)
    merged = load_run(out / "merged")
    ids = torch.randint(0, 200, (2, 12))
    assert torch.allclose(merged.model(ids).logits, adapted(ids).logits, atol=1e-5)


def test_finetune_mixlora_and_bad_merge(dense_run, tmp_path):
    assert main(["finetune", str(dense_run), "--adapter", "mixlora", "--experts", "2", "--k", "1", "--rank", "2",
                 "--out", str(tmp_path / "mix"), "--train.steps", "3", "--progress", "off"]) == 0
    rec = json.loads((tmp_path / "mix" / "adapter.json").read_text())
    assert rec["adapter"]["adapter"] == "mixlora" and rec["base_step"] == 4
    assert main(["finetune", str(dense_run), "--adapter", "smora", "--merge", "--out", str(tmp_path / "m2")]) == 2
    assert main(["finetune", str(dense_run), "--rank", "999", "--out", str(tmp_path / "m3")]) == 2

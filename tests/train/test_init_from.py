"""`train.init_from` + `train.only="routers"` on a moelab-trained run (the imported-HF case: tests/hf)."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.train.run import load_run
from moelab.train.trainer import train


def test_init_from_trains_only_the_routers(micro, tmp_path):
    cfg = micro(steps=2)
    train(cfg, tmp_path / "src", progress="off")
    tuned = micro(steps=2, init_from=str(tmp_path / "src"), only="routers", lr=0.05, warmup_steps=0)
    train(tuned, tmp_path / "tuned", progress="off")
    a, b = load_run(tmp_path / "src").model.state_dict(), load_run(tmp_path / "tuned").model.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".router." in k for k in changed)


def test_init_from_with_another_architecture_is_refused(micro, tmp_path):
    train(micro(steps=1), tmp_path / "src", progress="off")
    bad = micro(steps=1, init_from=str(tmp_path / "src"))
    bad.model.moe.num_experts = 6
    with pytest.raises(MoelabError, match="init_from"):
        train(bad, tmp_path / "bad", progress="off")
    with pytest.raises(MoelabError, match="train.only"):
        micro(only="experts").validate()

"""``train.compile`` (torch.compile): a compiled model trains like the eager one.

Slow (compilation takes tens of seconds on a small CPU): run with ``-m slow``. Which routers compile is
recorded in docs/compile.md (graph breaks are allowed; hard failures are not).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_micro import micro_config  # noqa: E402  (tests/train/train_micro.py)

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.models.config import ModelConfig  # noqa: E402
from moelab.models.transformer import MoETransformer  # noqa: E402
from moelab.train.trainer import train  # noqa: E402

pytestmark = pytest.mark.slow


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dispatch", ["auto", "sorted"])
def test_compiled_training_follows_the_eager_run(tmp_path, dispatch):
    runs = {}
    for compiled in (False, True):
        cfg = micro_config(tmp_path / str(compiled), steps=3, eval_every=0, ckpt_every=0, compile=compiled)
        cfg.model.moe.dispatch = dispatch
        summary = train(cfg, tmp_path / f"run-{compiled}", progress="off")
        runs[compiled] = (losses(tmp_path / f"run-{compiled}"), summary)
    (eager, s_eager), (comp, s_comp) = runs[False], runs[True]
    assert len(comp) == 3
    assert comp == pytest.approx(eager, rel=1e-4)
    assert s_comp["val_loss"] == pytest.approx(s_eager["val_loss"], rel=1e-4)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "hash", "top_p"])
def test_compiled_forward_and_gradients_equal_eager(router):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, d_ff_dense=48,
                      moe=MoEConfig(d_model=32, d_ff=24, num_experts=4, k=2, router=router))
    model = MoETransformer(cfg).train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, labels_BL=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref_grads = loss_and_grads(model)
    loss, grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)

"""Live logging backends (train.log): TensorBoard read back with TensorBoard's own reader, W&B offline,
clear errors for unknown or missing backends, and the explicit resume schedule."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from moelab.errors import MoelabError
from moelab.train import loggers
from moelab.train.metrics import read_jsonl
from moelab.train.trainer import lr_at, train


def _tb_scalars(log_dir):
    """{tag: [(step, value)]} read by tensorboard's EventAccumulator (an independent reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}, tags["images"], acc


def test_tensorboard_scalars_match_metrics_jsonl(micro, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    run = tmp_path / "run"
    train(micro(steps=6, log="jsonl,tensorboard", log_heatmap_every=3), run, progress="off")
    scalars, images, acc = _tb_scalars(run / "tensorboard")
    recs = read_jsonl(run / "metrics.jsonl")  # jsonl stays on
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in recs] == list(range(1, 7))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in recs], rel=1e-6)
    for key in loggers.LAYER_KEYS:
        got = [v for _, v in scalars[f"routing/layer1/{key}"]]
        assert got == pytest.approx([r["layers"][1][key] for r in recs], rel=1e-5, abs=1e-7), key
    assert "train/tokens_per_s" in scalars
    ev = read_jsonl(run / "eval.jsonl")[-1]
    assert scalars["val/ppl"] == [(6, pytest.approx(ev["val_ppl"], rel=1e-6))]
    assert set(scalars) >= {"val/ppl/alpha", "val/ppl/beta", "val/loss"}
    assert images == ["routing/load_heatmap"]
    assert [e.step for e in acc.Images("routing/load_heatmap")] == [3, 6]


def test_load_heatmap_rows_are_shares_of_counts():
    record = {"layers": [{"layer": 0, "counts": [3, 1, 0, 4]}, {"layer": 2, "counts": [0, 0, 2, 2]}]}
    share_LE = loggers.load_heatmap_LE(record)
    np.testing.assert_allclose(share_LE, [[3 / 8, 1 / 8, 0, 4 / 8], [0, 0, 0.5, 0.5]])
    img = loggers.heatmap_image_HWC(share_LE)
    assert img.shape == (2 * 16, 4 * 16, 3) and img.dtype == np.uint8
    assert loggers.load_heatmap_LE({"layers": [{"layer": 0}]}) is None


def test_wandb_offline(micro, tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed here (pip install wandb); the offline path is untested")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(micro(steps=2, log="wandb"), run, progress="off")
    assert list((run / "wandb").glob("offline-run-*")), "no offline run folder"


def test_unknown_backend_names_choices(micro):
    with pytest.raises(MoelabError, match=r"train.log.*'tensorbord'.*tensorboard"):
        micro(log="jsonl,tensorbord").validate()


def test_missing_package_is_a_clear_error_before_anything_is_written(micro, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(MoelabError, match=r"needs the 'wandb' package.*pip install wandb"):
        train(micro(steps=2, log="jsonl,wandb"), tmp_path / "run", progress="off")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["stretch", "continue"])
def test_resume_schedule_is_explicit(micro, tmp_path, capsys, mode):
    """Extending a finished 6-step run to 12: 'stretch' re-spreads the cosine (lr jumps up),
    'continue' keeps the 6-step schedule (lr stays at its minimum); a log line says which."""
    run = tmp_path / "run"
    train(micro(steps=6, warmup_steps=2), run, progress="log")
    capsys.readouterr()
    cfg = micro(steps=12, warmup_steps=2, resume_schedule=mode)
    train(cfg, run, resume=True, progress="log")
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"train.steps 6 -> 12, train.resume_schedule='{mode}'" in text
    lrs = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl")}
    min_lr = cfg.train.lr * cfg.train.min_lr_ratio
    assert lrs[6] == pytest.approx(min_lr)  # the first run ended at the bottom of its cosine
    if mode == "continue":
        assert all(lrs[s] == pytest.approx(min_lr) for s in range(7, 13))
    else:  # the 12-step cosine, by hand: progress (7-2)/(12-2) = 0.5
        assert lrs[7] == pytest.approx(min_lr + 0.5 * (cfg.train.lr - min_lr) * (1 + math.cos(math.pi * 0.5)))
        assert lrs[7] > 2 * lrs[6]


def test_bad_resume_schedule(micro):
    with pytest.raises(MoelabError, match="train.resume_schedule.*stretch.*continue"):
        micro(resume_schedule="restart").validate()

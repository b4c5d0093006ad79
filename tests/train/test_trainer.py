"""The training loop: learning, metrics, resume exactness, Ctrl-C, run dirs."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from moelab.errors import MoelabError
from moelab.train import trainer as trainer_mod
from moelab.train.checkpoint import list_checkpoints
from moelab.train.config import TrainConfig
from moelab.train.metrics import read_jsonl
from moelab.train.run import load_run
from moelab.train.trainer import lr_at, train


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_trains_and_writes_run_dir(micro, tmp_path):
    run = tmp_path / "run"
    summary = train(micro(steps=20), run, progress="off")
    for name in ("config.json", "data_manifest.json", "tokenizer.json", "metrics.jsonl", "eval.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    recs = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0  # learns the synthetic text
    assert math.log(259) == pytest.approx(recs[0]["lm_loss"], abs=0.5)  # starts near uniform
    for r in recs:
        assert set(r) >= {"step", "loss", "lm_loss", "aux_loss", "lr", "tokens_per_s", "tokens", "layers"}
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"], rel=1e-5)
        assert [layer["layer"] for layer in r["layers"]] == [0, 1]
        assert "counts" in r["layers"][0] and sum(r["layers"][0]["counts"]) == 4 * 16 * 2  # B*L*k slots
    assert recs[-1]["tokens"] == 20 * 4 * 16
    ev = read_jsonl(run / "eval.jsonl")[-1]
    assert ev["step"] == 20 and set(ev["per_domain"]) == {"alpha", "beta"}
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]))
    summary_disk = json.loads((run / "summary.json").read_text())
    assert summary_disk["val_loss"] == pytest.approx(ev["val_loss"]) == pytest.approx(summary["val_loss"])
    assert summary["params_active"] < summary["params_total"]
    assert summary_disk["eval_step"] == 20  # the step the reported val loss was measured at
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [20]


def test_eval_matches_loop_oracle(micro, tmp_path):
    """The per-domain val loss equals a plain loop of model losses over the eval batches."""
    run = tmp_path / "run"
    train(micro(steps=1), run, progress="off")
    loaded = load_run(run)
    from moelab.data.loader import eval_batches
    from moelab.data.pipeline import prepare_data

    data = prepare_data(loaded.config.data)
    result = trainer_mod.evaluate(loaded.model, data.splits.val, loaded.tokenizer, data.splits.domains,
                                  seq_len=16, batch_size=6, max_batches=1)
    for di, dom in enumerate(data.splits.domains):
        tot, n = 0.0, 0
        for b in eval_batches(data.splits.val, loaded.tokenizer, 16, 6, data.splits.domains, max_batches=1):
            for row in range(len(b.domain_B)):  # one sequence at a time, plain mean loss per row
                if int(b.domain_B[row]) != di:
                    continue
                with torch.no_grad():
                    out = loaded.model(b.input_ids_BL[row:row + 1], labels_BL=b.labels_BL[row:row + 1],
                                       valid_BL=b.valid_BL[row:row + 1])
                n_row = int(b.valid_BL[row].sum())
                tot += float(out.lm_loss) * n_row
                n += n_row
        assert result["per_domain"][dom]["loss"] == pytest.approx(tot / n, rel=1e-5)
        assert result["per_domain"][dom]["tokens"] == n
    assert result["val_loss"] == pytest.approx(
        sum(r["loss"] * r["tokens"] for r in result["per_domain"].values()) / result["tokens"])


def test_resume_is_exact(micro, tmp_path):
    """5 steps + resume + 5 steps gives the losses of 10 straight steps."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(micro(steps=10, eval_every=3), straight, progress="off")
    train(micro(steps=10, eval_every=3), split, progress="off", until_step=5)
    assert len(losses(split)) == 5
    train(micro(steps=10, eval_every=3), split, resume=True, progress="off")
    a, b = losses(straight), losses(split)
    assert len(a) == len(b) == 10
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-6)
    wa, wb = load_run(straight).model.state_dict(), load_run(split).model.state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_resume_after_sigint(micro, tmp_path, monkeypatch):
    """Ctrl-C at step 5 saves a checkpoint and returns; resuming finishes the run."""
    split = tmp_path / "split"
    real_update = trainer_mod.Progress.update

    def update(self, step, **kw):
        real_update(self, step, **kw)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer_mod.Progress, "update", update)
    summary = train(micro(steps=8), split, progress="off")
    assert summary["interrupted"] and summary["step"] == 5
    assert [s for s, _ in list_checkpoints(split / "checkpoints")] == [5]
    monkeypatch.setattr(trainer_mod.Progress, "update", real_update)
    resumed = train(micro(steps=8), split, resume=True, progress="off")
    assert not resumed["interrupted"] and [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == list(range(1, 9))


def test_keyboard_interrupt_mid_step_saves_last_completed_step(micro, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_mod.TrainStream.next_batch

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(trainer_mod.TrainStream, "next_batch", next_batch)
    summary = train(micro(steps=10), tmp_path / "run", progress="off")
    assert summary["interrupted"] and summary["step"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]


# Gradient accumulation (MoE, every balancing mode) and aux_loss_scale: tests/train/test_accumulation.py


def test_existing_run_dir_refused(micro, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    with pytest.raises(MoelabError, match="--resume.*--overwrite"):
        train(micro(steps=1), run, progress="off")
    assert (run / "something").exists()
    train(micro(steps=1), run, overwrite=True, progress="off")
    assert not (run / "something").exists() and (run / "summary.json").exists()


def test_resume_needs_run_dir(micro, tmp_path):
    with pytest.raises(MoelabError, match="not a run directory"):
        train(micro(steps=2), tmp_path / "nothing", resume=True, progress="off")


def test_too_small_dataset_message(micro, tmp_path):
    cfg = micro(steps=2, batch_size=2000)
    with pytest.raises(MoelabError, match="tokens but one batch needs"):
        train(cfg, tmp_path / "run", progress="off")


def test_lr_schedule():
    t = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, t) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(100, t) == pytest.approx(0.1)
    assert lr_at(55, t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    lrs = [lr_at(s, t) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_each_eval_writes_its_per_window_losses(micro, tmp_path):
    """eval_windows.json holds the latest evaluation's windows; they add up to the reported val loss."""
    import json

    run = tmp_path / "run"
    summary = train(micro(steps=2), run, progress="off")
    w = json.loads((run / "eval_windows.json").read_text())
    assert w["step"] == summary["eval_step"] and len(w["nll"]) == len(w["tokens"]) == summary["eval_windows"]
    assert sum(w["nll"]) / sum(w["tokens"]) == pytest.approx(summary["val_loss"], rel=1e-6)
    last = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()][-1]
    assert "window_nll" not in last and "window_tokens" not in last  # the log stays one short line per eval


def test_backfilled_windows_equal_the_trainers_own_and_a_mismatch_is_refused(micro, tmp_path):
    import json

    from moelab.sweep.windows import backfill, backfill_run

    run = tmp_path / "sweep" / "runs" / "a__seed0"
    train(micro(steps=2), run, progress="off")
    original = json.loads((run / "eval_windows.json").read_text())
    (run / "eval_windows.json").unlink()
    assert backfill(tmp_path / "sweep", write=lambda _: None) == 1
    again = json.loads((run / "eval_windows.json").read_text())
    assert again["step"] == original["step"] and again["tokens"] == original["tokens"]
    assert again["nll"] == pytest.approx(original["nll"], rel=1e-5)
    assert backfill(tmp_path / "sweep", write=lambda _: None) == 0  # nothing left to do
    (run / "eval_windows.json").unlink()
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "val_loss": summary["val_loss"] + 0.1}))
    with pytest.raises(MoelabError, match="not the .* it reported"):
        backfill_run(run)
    assert not (run / "eval_windows.json").exists()

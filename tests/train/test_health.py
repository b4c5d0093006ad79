"""Never fail silently while training: divergence (fault injection), skipped steps, loss worse than
uniform, routing collapse."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moelab.train import checkpoint as ckpt
from moelab.train import trainer as trainer_mod
from moelab.train.metrics import read_jsonl
from moelab.train.monitor import CollapseMonitor, TrainingDiverged
from moelab.train.trainer import train


def inject_nan_loss(monkeypatch, at_forward: int):
    """Fault injection: the model's forward number ``at_forward`` (1-based) returns a NaN loss."""
    real = trainer_mod.MoETransformer.forward
    calls = {"n": 0}

    def forward(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == at_forward:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod.MoETransformer, "forward", forward)
    return calls


def all_finite(path):
    sd, osd, _ = ckpt.read_checkpoint(path)
    tensors = list(sd.values()) + [t for st in osd["state"].values() for t in st.values() if torch.is_tensor(t)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_dense_divergence_stops_naming_the_step_and_keeps_finite_checkpoints(micro, tmp_path):
    """The issue's case: a dense model at lr 1e4 went NaN, logged null, trained on and saved NaN checkpoints."""
    cfg = micro(steps=12, lr=1e4, warmup_steps=0, ckpt_every=1, keep_last=2)
    cfg.model.moe_layers = "none"
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step (\d+)") as e:
        train(cfg, run, progress="off")
    bad_step = int(e.value.args[0].split("at step ")[1].split(":")[0])
    recs = read_jsonl(run / "metrics.jsonl")
    assert recs[-1]["step"] == bad_step and "error" in recs[-1]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in recs[:-1])
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert saved and saved[-1][0] == bad_step - 1  # the last good step, never the bad one
    assert all(all_finite(p) for _, p in saved)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged_at_step"] == bad_step and "diverged" in summary["error"]


def test_injected_nan_is_not_applied_and_run_resumes_from_last_good(micro, tmp_path, monkeypatch):
    inject_nan_loss(monkeypatch, at_forward=4)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="at step 4"):
        train(micro(steps=6, ckpt_every=2), run, progress="off")
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2]
    monkeypatch.undo()
    summary = train(micro(steps=6, ckpt_every=2), run, resume=True, progress="off")
    assert summary["step"] == 6 and [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))


def test_skip_mode_drops_the_bad_update_exactly(micro, tmp_path, monkeypatch):
    """on_nonfinite=skip: the NaN step changes no weight and no buffer (the aux-free bias included)."""
    def moe():
        cfg = micro(steps=3, on_nonfinite="skip")
        cfg.model.moe.aux_free_bias = True
        return cfg

    train(moe(), tmp_path / "two", progress="off", until_step=2)
    inject_nan_loss(monkeypatch, at_forward=3)
    summary = train(moe(), tmp_path / "skip", progress="off")
    recs = read_jsonl(tmp_path / "skip" / "metrics.jsonl")
    assert recs[2]["skipped"] and "skipped step 3" in recs[2]["warnings"][0]
    assert any("skipped step 3" in w for w in summary["warnings"])
    a = ckpt.read_checkpoint(ckpt.find_checkpoint(tmp_path / "two" / "checkpoints"))[0]
    b = ckpt.read_checkpoint(ckpt.find_checkpoint(tmp_path / "skip" / "checkpoints"))[0]
    for k in a:  # step 3 skipped: the weights after 3 steps are those after 2
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_skip_mode_gives_up_after_max_skipped_steps(micro, tmp_path, monkeypatch):
    real = trainer_mod.MoETransformer.forward

    def always_nan(self, *a, **kw):
        out = real(self, *a, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod.MoETransformer, "forward", always_nan)
    with pytest.raises(TrainingDiverged, match="at step 3.*2 consecutive steps were skipped"):
        train(micro(steps=10, on_nonfinite="skip", max_skipped_steps=2), tmp_path / "run", progress="off")


def test_moe_lr_too_high_warns_loss_above_uniform(micro, tmp_path, capsys):
    """The issue's MoE case (lr 1.0 ended at val ppl 555,975 with no warning), made to fail fast: a
    loss above ln(V) + 1 is warned in the log, in metrics.jsonl and in summary.json."""
    cfg = micro(steps=4, lr=1.0, warmup_steps=0)
    cfg.model.moe_layers = "none"
    real = trainer_mod.MoETransformer.forward

    def worse_than_uniform(self, *a, **kw):  # fault injection: loss = ln(V) + 3 (finite)
        out = real(self, *a, **kw)
        if out.lm_loss is not None:  # training forwards (eval computes its loss from the logits)
            out.lm_loss = out.lm_loss * 0 + math.log(259) + 3
        return out

    trainer_mod.MoETransformer.forward, saved = worse_than_uniform, real
    try:
        summary = train(cfg, tmp_path / "run", progress="log")
    finally:
        trainer_mod.MoETransformer.forward = saved
    assert "above ln(vocab_size)" in capsys.readouterr().out
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert "above ln(vocab_size)" in recs[0]["warnings"][0] and "warnings" not in recs[1]  # once
    assert any("worse than uniform" in w for w in summary["warnings"])


def test_collapse_monitor_on_the_issue_counts():
    """Counts [256, 256, 0, ...] (max/mean 4.0 = E/k with E=8, k=2) in every layer for 30 steps."""
    mon = CollapseMonitor(window=20)
    counts = [256, 256, 0, 0, 0, 0, 0, 0]
    out = []
    for step in range(1, 31):
        out.append(mon.update(step, [(0, {"counts": counts}, 2), (1, {"counts": counts}, 2)]))
    assert all(w == [] for w in out[:19])
    assert len(out[19]) == 2 and all(w == [] for w in out[20:])  # once per layer per episode
    msg = out[19][0]
    for part in ("layer 0", "step 20", "max/mean 4.00", "E/k = 4.00", "6 of 8 experts got no tokens",
                 "expert 0 50.0%", "expert 1 50.0%"):
        assert part in msg, part
    balanced = [128] * 8
    assert mon.update(31, [(0, {"counts": balanced}, 2)]) == []  # recovered: re-arms
    for step in range(32, 52):
        w = mon.update(step, [(0, {"counts": counts}, 2)])
    assert w and "layer 0" in w[0]


def test_collapse_monitor_dead_expert_and_quiet_when_balanced():
    mon = CollapseMonitor(window=5)
    one_dead = [100, 100, 100, 0]  # max/mean 1.33, far from E/k = 2, but expert 3 starves
    warns = [mon.update(s, [(2, {"counts": one_dead}, 2)]) for s in range(1, 6)]
    assert warns[-1] and "experts [3]" in warns[-1][0] and "layer 2" in warns[-1][0]
    mon = CollapseMonitor(window=5)
    rotating = [[0, 100, 100, 100], [100, 0, 100, 100]]  # a different expert idle each step: no collapse
    assert all(mon.update(s, [(0, {"counts": rotating[s % 2]}, 2)]) == [] for s in range(1, 20))
    assert CollapseMonitor(window=0).update(1, [(0, {"counts": [1, 0]}, 1)]) == []


def test_trainer_reports_collapse_in_log_and_metrics(micro, tmp_path, capsys):
    """Real routers forced to two experts (a forward hook on each gate): the trainer warns."""
    cfg = micro(steps=6, collapse_window=4)
    cfg.model.moe.num_experts, cfg.model.moe.aux_loss = 8, "none"
    real_init = trainer_mod.MoETransformer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        for _, layer in self.moe_layers():
            favour = torch.tensor([30.0, 30.0] + [0.0] * 6)
            layer.router.gate.register_forward_hook(lambda m, i, out: out * 0 + favour)

    trainer_mod.MoETransformer.__init__ = init
    try:
        summary = train(cfg, tmp_path / "run", progress="log")
    finally:
        trainer_mod.MoETransformer.__init__ = real_init
    log = capsys.readouterr().out
    assert "routing collapse in layer 0 at step 4" in log and "routing collapse in layer 1" in log
    rec = read_jsonl(tmp_path / "run" / "metrics.jsonl")[3]
    assert rec["layers"][0]["counts"][2:] == [0] * 6 and len(rec["warnings"]) == 2
    assert "expert 0 50.0%" in rec["warnings"][0]
    assert len(summary["warnings"]) == 2


def test_router_finite_check_becomes_a_divergence_naming_the_step(micro, tmp_path):
    """MoE runs used to stop only through the router's own check, whose message names no step."""
    real_init = trainer_mod.MoETransformer.__init__
    calls = {"n": 0}

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        layer = next(iter(self.moe_layers()))[1]

        def poison(m, i, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 3 else out

        layer.router.gate.register_forward_hook(poison)

    trainer_mod.MoETransformer.__init__ = init
    try:
        with pytest.raises(TrainingDiverged, match=r"diverged at step 3: .*\[router .*non-finite"):
            train(micro(steps=5, ckpt_every=1), tmp_path / "run", progress="off")
    finally:
        trainer_mod.MoETransformer.__init__ = real_init
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 2

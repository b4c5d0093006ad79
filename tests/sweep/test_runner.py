"""Running a sweep: a sweep killed mid-run continues where it stopped, without retraining finished runs."""

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from moelab.errors import MoelabError
from moelab.sweep.runner import CONFIGS_DIR, plan_sweep, run_state, run_sweep, write_plan
from moelab.sweep.spec import SweepSpec


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_sweep_resumes_the_interrupted_run_and_skips_the_finished_one(micro, tmp_path):
    from moelab.train.trainer import train

    steps = 30
    spec = SweepSpec.from_dict({"name": "t", "seeds": [0], "base": micro(steps=steps, ckpt_every=3),
                                "axes": {"moe.router": ["softmax_topk", "sigmoid_topk"]}})
    sw = tmp_path / "sw"
    plan = plan_sweep(spec, sw)
    write_plan(plan)
    a, b = plan.runs

    # run A finished (trained in-process: cheaper); run B is killed (SIGKILL: no chance to save
    # anything) right after its first checkpoint
    train(a.config, a.run_dir, progress="off")
    proc = subprocess.Popen([sys.executable, "-m", "moelab.sweep.worker", str(sw / CONFIGS_DIR / f"{b.name}.json"),
                             str(b.run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((b.run_dir / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state_b, step_b = run_state(b.run_dir)
    assert run_state(a.run_dir)[0] == "done" and state_b == "partial" and 0 < step_b < steps
    a_files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in a.run_dir.iterdir() if p.is_file()}

    out = io.StringIO()
    result = run_sweep(spec, sw, progress="log", stream=out, poll_s=0.05)
    assert result.ok, (result.failed, out.getvalue())
    assert result.skipped == [a.name] and result.finished == [b.name]
    # the finished run was not touched, the interrupted one resumed from its checkpoint (not from 0)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in a.run_dir.iterdir() if p.is_file()} == a_files
    log_b = (sw / "logs" / f"{b.name}.log").read_text()
    assert f"steps {(step_b // 3) * 3}..{steps}" in log_b and "steps 0.." not in log_b
    for r in (a, b):
        assert _steps(r.run_dir) == list(range(1, steps + 1))  # every step logged exactly once
        assert run_state(r.run_dir)[0] == "done"
    text = out.getvalue()
    assert f"resuming {b.name}" in text and "(2/2 done" in text

    # the leaderboard reads the real run directories
    from moelab.sweep.leaderboard import build_leaderboard

    lb = build_leaderboard(sw, metric="val_loss")
    assert sorted(g.group for g in lb.groups) == sorted({a.group, b.group}) and lb.fairness.fair
    summary = json.loads((a.run_dir / "summary.json").read_text())
    row = next(g for g in lb.groups if g.group == a.group)
    assert row.stats["val_loss"].mean == summary["val_loss"] and row.stats["experts_per_token"].mean == 2.0
    assert row.stats["params_active"].mean == a.params_active and lb.domains == ["alpha", "beta"]

    # a second invocation trains nothing; a changed spec refuses to reuse the runs
    again = run_sweep(spec, sw, progress="off")
    assert again.finished == [] and sorted(again.skipped) == sorted(r.name for r in plan.runs)
    # a run written before a config key existed (here: model.depth) is the same config: the key's default
    saved = json.loads((a.run_dir / "config.json").read_text())
    assert "depth" in saved["model"]
    del saved["model"]["depth"]
    (a.run_dir / "config.json").write_text(json.dumps(saved))
    assert plan_sweep(spec, sw).runs[0].state == "done"
    spec.base["train.lr"] = 5e-3
    with pytest.raises(MoelabError, match=r"different config.*train.lr"):
        plan_sweep(spec, sw)


FAKE_PYTHON = """#!/bin/sh
# stands in for python: fails for runs named bad*, writes a finished run otherwise
run_dir="$4"
case "$(basename "$run_dir")" in
  bad*) echo "Traceback (most recent call last): boom"; exit 1 ;;
esac
mkdir -p "$run_dir"
echo '{}' > "$run_dir/config.json"
echo '{"step": 3, "steps": 3, "interrupted": false, "val_loss": 1.0}' > "$run_dir/summary.json"
"""


def test_failed_run_is_reported_and_the_others_continue(micro, tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    spec = SweepSpec.from_dict({"name": "t", "seeds": [0], "base": micro(steps=3, ckpt_every=0),
                                "variants": [{"name": "bad"}, {"name": "good"}]})
    result = run_sweep(spec, tmp_path / "sw", progress="off", poll_s=0.01, python=str(fake))
    assert list(result.failed) == ["bad__seed0"] and result.finished == ["good__seed0"] and not result.ok
    assert "log" in result.failed["bad__seed0"]
    assert "Traceback" in (tmp_path / "sw" / "logs" / "bad__seed0.log").read_text()
    stopped = run_sweep(SweepSpec.from_dict({**spec.to_dict(), "variants": [{"name": "bad"}, {"name": "bad2"}]}),
                        tmp_path / "sw2", progress="off", poll_s=0.01, python=str(fake), fail_fast=True)
    assert list(stopped.failed) == ["bad__seed0"] and stopped.finished == []


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_workers_gracefully_and_a_rerun_finishes(micro, tmp_path):
    steps = 400
    base = micro(steps=steps, ckpt_every=1000)
    sw = tmp_path / "sw"
    spec = SweepSpec.from_dict({"name": "t", "seeds": [0], "base": base})
    toml = "seeds = [0]\n[base]\n" + "\n".join(f'"{k}" = {json.dumps(v)}' for k, v in base.items()) + "\n"
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(toml)
    proc = subprocess.Popen([sys.executable, "-m", "moelab.cli.main", "sweep", str(spec_file), "--out", str(sw),
                             "--progress", "log", "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = sw / "runs" / "base__seed0"
    deadline = time.time() + 300
    while (not (run_dir / "metrics.jsonl").is_file() or run_state(run_dir)[1] < 5) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 130, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] and 5 <= summary["step"] < steps
    assert run_state(run_dir) == ("partial", summary["step"])
    assert (run_dir / "checkpoints" / f"step_{summary['step']:06d}").is_dir()  # saved at the last step
    result = run_sweep(spec, sw, progress="off", poll_s=0.05)
    assert result.finished == ["base__seed0"] and _steps(run_dir) == list(range(1, steps + 1))

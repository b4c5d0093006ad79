"""Resume never trusts what it reads: state.json checksum and step, fallback to the newest valid
checkpoint, stale temporary folders, rotation by renaming, kill -9 while saving (fault injection)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelab
from moelab.errors import MoelabError
from moelab.train import checkpoint as ckpt
from moelab.train.metrics import read_jsonl, truncate_after
from moelab.train.trainer import train

from test_checkpoint import model_and_optimizer  # noqa: E402  (tests/train)


def losses(run):
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def edit_state(path, fn):
    f = path / ckpt.STATE_FILE
    state = json.loads(f.read_text())
    fn(state)
    f.write_text(json.dumps(state))


@pytest.mark.parametrize("edit", [
    lambda s: s.update(step=s["step"] + 1),
    lambda s: s["data"].update(cursor=s["data"]["cursor"] + 1),
    lambda s: s["rng"].update(python=[s["rng"]["python"][0], [0] * len(s["rng"]["python"][1]), None]),
    lambda s: s.pop("state_sha256"),
], ids=["step", "data.cursor", "rng", "no checksum"])
def test_edited_state_json_is_refused(tmp_path, edit):
    model, opt = model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, {"data": {"epoch": 0, "cursor": 5}})
    ckpt.read_checkpoint(path)  # valid before the edit
    edit_state(path, edit)
    with pytest.raises(MoelabError, match="corrupted"):
        ckpt.read_checkpoint(path)


def test_step_must_match_the_folder_name(tmp_path):
    model, opt = model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt)
    path.rename(tmp_path / "step_000007")
    with pytest.raises(MoelabError, match="says step=3, the folder name says 7"):
        ckpt.read_checkpoint(tmp_path / "step_000007")


def test_version_1_checkpoints_still_load(tmp_path):
    model, opt = model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt)
    edit_state(path, lambda s: (s.pop("state_sha256"), s.update(format_version=1)))
    assert ckpt.read_checkpoint(path)[2]["step"] == 3


def test_nonfinite_weights_are_never_saved_or_rotated_in(tmp_path):
    model, opt = model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, keep_last=1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(MoelabError, match="refusing to save checkpoint step=2: weight '0.weight'"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]  # the good one is kept
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_rotation_renames_before_deleting(tmp_path, monkeypatch):
    model, opt = model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, model, opt)

    def crash(path, ignore_errors=False):
        raise KeyboardInterrupt  # dies while deleting the old checkpoint

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, keep_last=1)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]  # never a half-deleted step_000001
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == [f".del-step_000001-{os.getpid()}"]
    assert ckpt.clean_stale(tmp_path) == leftovers and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_clean_stale_keeps_folders_of_live_writers(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for name in (f".tmp-step_000002-{live.pid}", ".tmp-step_000003-999999999", ".old-step_000001-999999999"):
            (tmp_path / name).mkdir()
        assert ckpt.clean_stale(tmp_path) == [".old-step_000001-999999999", ".tmp-step_000003-999999999"]
        assert [p.name for p in tmp_path.iterdir()] == [f".tmp-step_000002-{live.pid}"]
    finally:
        live.kill()
        live.wait()


def test_corrupt_newest_checkpoint_falls_back_with_warning_and_stays_exact(micro, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(micro(steps=8), straight, progress="off")
    train(micro(steps=8, ckpt_every=2, keep_last=3), split, progress="off", until_step=6)
    newest = ckpt.find_checkpoint(split / "checkpoints")
    data = bytearray((newest / ckpt.MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF
    (newest / ckpt.MODEL_FILE).write_bytes(bytes(data))
    train(micro(steps=8, ckpt_every=2, keep_last=3), split, resume=True, progress="log")
    out = capsys.readouterr().out
    assert "step_000006" in out and "falling back" in out and "resuming from step_000004" in out
    assert any(p.name.startswith("corrupt-step_000006") for p in (split / "checkpoints").iterdir())
    torch.testing.assert_close(torch.tensor(losses(split)), torch.tensor(losses(straight)), rtol=0, atol=1e-6)


def test_no_valid_checkpoint_names_each(micro, tmp_path):
    run = tmp_path / "run"
    train(micro(steps=2), run, progress="off")
    edit_state(ckpt.find_checkpoint(run / "checkpoints"), lambda s: s.update(tokens_seen=1))
    with pytest.raises(MoelabError, match="no valid checkpoint.*step_000002.*edited"):
        train(micro(steps=4), run, resume=True, progress="off")


def test_malformed_metrics_line_is_kept_and_warned_on_resume(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2, "loss": 1.\n{"step": 3}\n{"step": 4}\n{"step": 5, "lo')
    warned = []
    truncate_after(f, 3, warn=warned.append)
    assert f.read_text() == '{"step": 1}\n{"step": 2, "loss": 1.\n{"step": 3}\n'
    assert len(warned) == 2 and "line 2" in warned[0] and "kept" in warned[0]
    assert "line 5" in warned[1] and "dropped" in warned[1]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # written via a temp file + rename


_KILLER = r"""
import json, os, signal, shutil, sys
from pathlib import Path
import moelab.train.checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.train.trainer import train

cfg_path, run_dir, where = sys.argv[1:4]
real_fsync, real_rmtree = ckpt._fsync, shutil.rmtree

def fsync(path):  # kill -9 in the middle of writing step 4 (its files are written, not renamed)
    if where == "write" and Path(path).parent.name.startswith(".tmp-step_000004") and Path(path).name == "state.json":
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(path)

def rmtree(path, *a, **kw):  # kill -9 while rotating an old checkpoint out (renamed, not deleted)
    if where == "rotate" and Path(path).name.startswith(".del-step_000002"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *a, **kw)

ckpt._fsync, ckpt.shutil.rmtree = fsync, rmtree
train(RunConfig.from_dict(json.loads(Path(cfg_path).read_text())), run_dir, progress="off")
"""


@pytest.mark.parametrize("where, stale", [("write", ".tmp-step_000004-"),
                                          pytest.param("rotate", ".del-step_000002-", marks=pytest.mark.slow)])
def test_kill_9_while_saving_then_resume_is_exact(micro, tmp_path, where, stale):
    """Fault injection: SIGKILL inside a checkpoint save; the resumed run equals a straight one."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(micro(steps=6), straight, progress="off")
    cfg = micro(steps=6, ckpt_every=1, keep_last=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, PYTHONPATH=str(Path(moelab.__file__).parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path / "cfg.json"), str(run), where], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(n.startswith(stale) for n in names), names
    for _, p in ckpt.list_checkpoints(run / "checkpoints"):
        ckpt.read_checkpoint(p)  # every step_* folder left behind is complete
    train(micro(steps=6, ckpt_every=1, keep_last=2), run, resume=True, progress="off")
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # stale folder removed
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(straight)), rtol=0, atol=1e-6)


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
    """Fault injection: the rename that publishes the new config.json fails; the old one is intact."""
    from moelab.train.config import RunConfig

    f = tmp_path / "config.json"
    cfg = RunConfig()
    cfg.save(f)
    before = f.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    cfg.train.steps = 5
    with pytest.raises(OSError, match="disk full"):
        cfg.save(f)
    monkeypatch.undo()
    assert f.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["config.json"]

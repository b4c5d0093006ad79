"""Bad inputs and corrupt files give named errors (file, tensor or parameter named), never a raw
traceback or a silently wrong result. One table, one run directory copied per case."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest

from moelab.analysis.analyses import pick_steps
from moelab.cli.main import main
from moelab.data.corpus import DataConfig, load_corpus
from moelab.errors import MoelabError
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.trainer import train

from train_micro import micro_config  # noqa: E402  (tests/train)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    train(micro_config(root, steps=2), run, progress="off")
    return run


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def other_shapes(run):
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["moe"]["d_ff"] = 48
    (run / "config.json").write_text(json.dumps(cfg))


def corrupt_weights(run):
    f = ckpt.find_checkpoint(run / "checkpoints") / ckpt.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-2] ^= 0xFF
    f.write_bytes(bytes(data))


CASES = [  # (id, damage to the run dir, command, pattern the error must match)
    ("eval, truncated config.json", lambda r: truncate(r / "config.json"), ["eval"], r"config.json.*corrupted or truncated"),
    ("info, truncated config.json", lambda r: truncate(r / "config.json"), ["info"], r"config.json.*corrupted or truncated"),
    ("resume, truncated config.json", lambda r: truncate(r / "config.json"), ["resume"], r"config.json.*corrupted or truncated"),
    ("info, truncated summary.json", lambda r: truncate(r / "summary.json"), ["info"], r"summary.json.*corrupted or truncated"),
    ("eval, truncated tokenizer.json", lambda r: truncate(r / "tokenizer.json"), ["eval"], r"tokenizer file.*tokenizer.json.*corrupted"),
    ("resume, truncated tokenizer.json", lambda r: truncate(r / "tokenizer.json"), ["resume"], r"tokenizer file.*tokenizer.json.*corrupted"),
    ("eval, model of other shapes", other_shapes, ["eval"], r"does not fit the model.*ffn\.experts\.w_\w+_E\w+ is \(4, \d+, \d+\) in the checkpoint, \(4, \d+, \d+\) in the model"),
    ("resume, model of other shapes", other_shapes, ["resume"], r"does not fit the model of the run's config.json.*experts\.w_"),
    ("analyze --windows 0", lambda r: None, ["analyze", "--windows", "0"], r"num_windows=0 is out of range"),
    ("analyze --max-traces 0", lambda r: None, ["analyze", "--max-traces", "0"], r"max_traces=0"),
    ("analyze, trace fails", corrupt_weights, ["analyze", "--windows", "2"], r"tracing .* failed: checkpoint .* corrupted"),
]


@pytest.mark.parametrize("damage, command, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_named_error(trained, tmp_path, capsys, damage, command, pattern):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run)
    if command[0] == "resume":
        argv = ["train", "--run-dir", str(run), "--resume", "--train.steps", "3", "--progress", "off"]
    else:
        argv = [command[0], str(run), *command[1:]]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("moelab: error: ") and "Traceback" not in err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("kw, pattern", [
    (dict(lr="0.1"), r"train.lr='0.1' is not valid; expected float \(got str\)"),
    (dict(steps=2.5), r"train.steps=2.5 is not valid; expected int"),
    (dict(compile="yes"), r"train.compile='yes' is not valid; expected bool"),
    (dict(on_nonfinite="ignore"), r"train.on_nonfinite='ignore' is not valid; choose one of: 'stop', 'skip'"),
    (dict(collapse_ratio=1.5), r"train.collapse_ratio=1.5 is out of range"),
    (dict(max_skipped_steps=0), r"train.max_skipped_steps=0 is out of range"),
])
def test_train_config_types_named(kw, pattern):
    with pytest.raises(MoelabError, match=pattern):
        TrainConfig(**kw).validate()


def test_run_config_checks_section_types():
    cfg = RunConfig()
    cfg.data.seq_len = "128"
    with pytest.raises(MoelabError, match=r"data.seq_len='128' is not valid; expected int"):
        cfg.validate()


def test_pick_steps_one_is_the_last():
    assert pick_steps([10, 20, 30], 1) == [30]
    assert pick_steps([10, 20, 30, 40, 50], 2) == [10, 50]
    assert pick_steps([10, 20], 3) == [10, 20]


def test_val_fraction_zero_trains_without_eval_and_writes_summary(tmp_path, capsys):
    cfg = micro_config(tmp_path, steps=3, eval_every=2)
    cfg.data.val_fraction = 0.0
    summary = train(cfg, tmp_path / "run", progress="log")
    assert "val split is empty" in capsys.readouterr().out
    disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert disk["step"] == 3 and disk["val_loss"] is None and summary["val_loss"] is None
    assert (tmp_path / "run" / "eval.jsonl").read_text() == ""


def test_non_utf8_text_is_warned_and_recorded(tmp_path):
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    (root / "a" / "good.txt").write_text("fine text\n" * 20)
    (root / "a" / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 20)  # latin-1, not UTF-8
    cfg = DataConfig(source=str(root), tokenizer="byte", seq_len=8, val_fraction=0.0, test_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UnicodeWarning, match=r"bad.txt.*not valid UTF-8: 20 U\+FFFD replacements, first invalid byte at offset 3"):
        splits = load_corpus(cfg)
    assert splits.manifest["non_utf8_files"] == {"a/bad.txt": "20 U+FFFD replacements, first invalid byte at offset 3"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid file says nothing
        (root / "a" / "bad.txt").write_text("café au lait\n")
        assert "non_utf8_files" not in load_corpus(cfg).manifest


def test_non_utf8_jsonl_is_a_named_error(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MoelabError, match=r"rows.jsonl' line 2 is not valid UTF-8"):
        load_corpus(DataConfig(source=str(f), tokenizer="byte", seq_len=8, cache_dir=str(tmp_path / "cache")))

"""``moelab train | eval | generate | info | demo`` end to end on a micro config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from train_micro import micro_config  # noqa: E402  (tests/train/train_micro.py)

from moelab.cli.main import main  # noqa: E402


@pytest.fixture
def cfg_file(tmp_path):
    cfg = micro_config(tmp_path, steps=4)
    p = tmp_path / "micro.json"
    p.write_text(json.dumps(cfg.to_dict()))
    return p


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_commands_and_keys(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "generate", "info", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for word in ("--preset", "--config", "--run-dir", "--resume", "--overwrite", "moe.router (str",
                 "train.steps (int", "data.source", "model.moe_layers"):
        assert word in out
    for cmd in ("eval", "generate", "info", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: moelab " + cmd in capsys.readouterr().out


def test_train_info_eval_generate(tmp_path, cfg_file, capsys):
    rd = tmp_path / "run"
    rc, out, _ = run(["train", "--config", cfg_file, "--run-dir", rd, "--progress", "off", "--train.steps", "3",
                      "--moe.num_experts", "2", "moe.k=1"], capsys)
    assert rc == 0 and "val perplexity (all)" in out and "load max/mean" in out
    saved = json.loads((rd / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["model"]["moe"]["num_experts"] == 2 and saved["model"]["moe"]["k"] == 1
    rc, out, _ = run(["info", rd], capsys)
    assert rc == 0 and "active per token" in out and "experts=2 k=1" in out
    rc, out, _ = run(["info", rd, "--json"], capsys)
    info = json.loads(out)
    assert info["params"]["total"] == info["summary"]["params_total"]
    rc, out, _ = run(["eval", rd, "--json", "--max-batches", "1"], capsys)
    ev = json.loads(out)
    assert rc == 0 and ev["step"] == 3 and set(ev["per_domain"]) == {"alpha", "beta"}
    rc, out, _ = run(["eval", rd, "--split", "test", "--max-batches", "1"], capsys)
    assert rc == 0 and "alpha" in out and "test split" in out
    rc, a, _ = run(["generate", rd, "--prompt", "ab cd", "--max-new-tokens", "11", "--seed", "1"], capsys)
    rc2, b, _ = run(["generate", rd, "--prompt", "ab cd", "--max-new-tokens", "11", "--seed", "1"], capsys)
    assert rc == rc2 == 0 and a == b and a.startswith("ab cd")
    # 5 prompt bytes + 12 new tokens > max_seq_len 16: refused with the limit named, or a sliding window
    rc, _, err = run(["generate", rd, "--prompt", "ab cd", "--max-new-tokens", "12"], capsys)
    assert rc == 2 and "max_seq_len=16" in err and "sliding_window" in err
    rc, c, _ = run(["generate", rd, "--prompt", "ab cd", "--max-new-tokens", "12", "--sliding-window"], capsys)
    assert rc == 0 and c.startswith("ab cd")
    # resume extends the run
    rc, out, _ = run(["train", "--run-dir", rd, "--resume", "--train.steps", "5", "--progress", "off"], capsys)
    assert rc == 0
    assert [json.loads(l)["step"] for l in (rd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("args, match", [
    (["--train.stepz", "3"], "unknown config key.*valid keys of train"),
    (["--moe.aux_loss", "magic"], "moe.aux_loss='magic' is not valid; choose one of"),
    (["--train.steps", "x"], "expected int"),
])
def test_bad_config_is_a_clean_error(tmp_path, cfg_file, capsys, args, match):
    rc, _, err = run(["train", "--config", cfg_file, "--run-dir", tmp_path / "r", *args], capsys)
    assert rc == 2 and err.startswith("moelab: error:")
    assert __import__("re").search(match, err)
    assert "Traceback" not in err


def test_existing_run_dir_refused(tmp_path, cfg_file, capsys):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "keep.txt").write_text("mine")
    rc, _, err = run(["train", "--config", cfg_file, "--run-dir", rd], capsys)
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    assert (rd / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["empty", "tiny"])
def test_bad_dataset_is_a_clean_error(tmp_path, cfg_file, capsys, kind):
    src = tmp_path / "src"
    src.mkdir()
    if kind == "tiny":
        (src / "a.txt").write_text("just a few words here\n")
    rc, _, err = run(["train", "--config", cfg_file, "--run-dir", tmp_path / "r", "--data.source", src,
                      "--data.val_fraction", "0", "--data.test_fraction", "0"], capsys)
    assert rc == 2 and err.startswith("moelab: error:")
    assert ("empty" in err) if kind == "empty" else ("tokens but one batch needs" in err)


def test_corrupted_checkpoint_refused(tmp_path, cfg_file, capsys):
    rd = tmp_path / "run"
    assert run(["train", "--config", cfg_file, "--run-dir", rd, "--train.steps", "2", "--progress", "off"], capsys)[0] == 0
    weights = next((rd / "checkpoints").iterdir()) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    for argv in (["eval", rd], ["generate", rd, "--prompt", "x"],
                 ["train", "--run-dir", rd, "--resume", "--train.steps", "3", "--progress", "off"]):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "corrupted" in err and "sha256" in err, argv


def test_demo_micro(tmp_path, capsys):
    """The demo command's pipeline (embedded corpus, train, eval, summary table) at micro sizes."""
    rd = tmp_path / "demo"
    micro = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--moe.d_ff", "32",
             "--data.tokenizer", "byte", "--data.seq_len", "32", "--model.max_seq_len", "32",
             "--train.batch_size", "2", "--train.eval_max_batches", "1", "--data.max_chars_per_domain", "100000",
             "--data.cache_dir", tmp_path / "cache"]
    rc, out, _ = run(["demo", "--steps", "2", "--run-dir", rd, "--progress", "off", *micro], capsys)
    assert rc == 0
    assert "val perplexity (all)" in out and "val perplexity (code)" in out and "val perplexity (prose)" in out
    assert "tokens/s" in out and "load CV" in out
    # a second demo replaces the first run
    rc, out, _ = run(["demo", "--steps", "1", "--run-dir", rd, "--progress", "off", *micro], capsys)
    assert rc == 0 and json.loads((rd / "summary.json").read_text())["step"] == 1


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    rd = tmp_path / "demo"
    rc, out, _ = run(["demo", "--steps", "2", "--run-dir", rd, "--progress", "off", "--train.eval_max_batches", "1",
                      "--data.cache_dir", tmp_path / "cache", "--data.max_chars_per_domain", "200000"], capsys)
    assert rc == 0
    assert "val perplexity (all)" in out and "val perplexity (code)" in out and "val perplexity (prose)" in out
    assert "tokens/s" in out and "load CV" in out
    assert (rd / "summary.json").is_file()
    # a second demo replaces the first run
    rc, out, _ = run(["demo", "--steps", "1", "--run-dir", rd, "--progress", "off", "--train.eval_max_batches", "1",
                      "--data.cache_dir", tmp_path / "cache", "--data.max_chars_per_domain", "200000"], capsys)
    assert rc == 0 and json.loads((rd / "summary.json").read_text())["step"] == 1

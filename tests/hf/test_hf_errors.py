"""Bad input to import/export: each a MoelabError naming the file, tensor or parameter (table-driven)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from moelab.errors import MoelabError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, fn):
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def empty_folder(tmp, f):
    (tmp / "e").mkdir()
    return tmp / "e"


def not_a_folder(tmp, f):
    (tmp / "file.txt").write_text("x")
    return tmp / "file.txt"


def bad_json(tmp, f):
    d = _copy(f["mixtral"], tmp / "j")
    (d / "config.json").write_text("{not json")
    return d


def unsupported_arch(tmp, f):
    d = _copy(f["mixtral"], tmp / "u")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "switch_transformers", "num_experts": 4}))
    return d


def dense_model(tmp, f):
    d = _copy(f["mixtral"], tmp / "d")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return d


def no_weights(tmp, f):
    d = _copy(f["mixtral"], tmp / "w")
    (d / "model.safetensors").unlink()
    return d


def corrupt_weights(tmp, f):
    d = _copy(f["mixtral"], tmp / "c")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    return d


def missing_expert(tmp, f):
    d = _copy(f["mixtral"], tmp / "m")
    _rewrite(d, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    return d


def misshaped_expert(tmp, f):
    d = _copy(f["qwen2_moe"], tmp / "s")
    k = "model.layers.0.mlp.experts.2.up_proj.weight"
    _rewrite(d, lambda sd: sd.__setitem__(k, sd[k][:-1].contiguous()))
    return d


def misshaped_fused(tmp, f):
    d = _copy(f["gpt_oss"], tmp / "g")
    k = "model.layers.1.mlp.experts.down_proj"
    _rewrite(d, lambda sd: sd.__setitem__(k, sd[k][:, :-1].contiguous()))
    return d


def missing_router(tmp, f):
    d = _copy(f["gpt_oss"], tmp / "r")
    _rewrite(d, lambda sd: sd.pop("model.layers.0.mlp.router.weight"))
    return d


CASES = [
    ("hub name", lambda tmp, f: "mistralai/Mixtral-8x7B-v0.1", "huggingface-cli download mistralai/Mixtral-8x7B-v0.1"),
    ("missing path", lambda tmp, f: tmp / "nope", "does not exist"),
    ("empty folder", empty_folder, "config.json is missing"),
    ("a file", not_a_folder, "is a file"),
    ("bad config json", bad_json, "config.json is not valid JSON"),
    ("unsupported architecture", unsupported_arch, "switch_transformers.*supported: mixtral, olmoe, qwen2_moe"),
    ("dense model", dense_model, "'llama' is a dense model"),
    ("no weights", no_weights, "has no weights"),
    ("corrupt weights", corrupt_weights, "model.safetensors' is not readable safetensors"),
    ("missing expert tensor", missing_expert, r"tensor model.layers.1.block_sparse_moe.experts.3.w2.weight is missing"),
    ("mis-shaped expert tensor", misshaped_expert, r"tensor model.layers.0.mlp.experts.2.up_proj.weight has shape \(47, 32\)"),
    ("mis-shaped fused experts", misshaped_fused, r"tensor model.layers.1.mlp.experts.down_proj has shape \(4, 47, 32\)"),
    ("missing router tensor", missing_router, "tensor model.layers.0.mlp.router.weight is missing"),
]


@pytest.mark.parametrize("case,make,match", CASES, ids=[c[0] for c in CASES])
def test_bad_import_input(case, make, match, hf_folders, tmp_path):
    from moelab.hf import from_pretrained

    path = make(tmp_path, {k: v[0] for k, v in hf_folders.items()})
    with pytest.raises(MoelabError, match=match):
        from_pretrained(path)


def test_missing_tokenizer_is_refused_by_import(hf_folders, tmp_path):
    from moelab.hf import import_to_run

    d = _copy(hf_folders["olmoe"][0], tmp_path / "t")
    for p in d.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()
    with pytest.raises(MoelabError, match="has no tokenizer"):
        import_to_run(d, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_reports_errors_and_refuses_existing_out(hf_folders, tmp_path, capsys):
    from moelab.cli.main import main

    assert main(["hf", "import", "org/name", "--out", str(tmp_path / "r")]) == 2
    assert "huggingface-cli download org/name" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["hf", "import", str(hf_folders["olmoe"][0]), "--out", str(tmp_path / "busy")]) == 2
    assert "--out=" in capsys.readouterr().err
    assert main(["hf", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_hf_run_with_bad_format_is_refused(hf_folders, tmp_path):
    from moelab.hf import import_to_run
    from moelab.train.run import load_run

    run = import_to_run(hf_folders["olmoe"][0], tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["hf"]["format"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoelabError, match="hf.format=99"):
        load_run(run)

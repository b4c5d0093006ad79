"""RunConfig: dotted overrides parsed by type, files, errors naming the valid choices."""

from __future__ import annotations

import json

import pytest

from moelab.errors import MoelabError
from moelab.train.config import RunConfig, apply_overrides, config_keys
from moelab.train.presets import PRESETS, preset


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(RunConfig(), [
        "--moe.num_experts", "16", "--train.steps=100", "--train.lr", "1e-3", "--model.tie_embeddings", "false",
        "--moe.router_kwargs", '{"jitter": 0.1}', "--moe.capacity_factor", "1.25", "--model.moe_layers", "[0, 2]",
        "--data.max_chars_per_domain", "none", "moe.k=4",
    ])
    assert cfg.model.moe.num_experts == 16 and cfg.train.steps == 100 and cfg.train.lr == 1e-3
    assert cfg.model.tie_embeddings is False and cfg.model.moe.router_kwargs == {"jitter": 0.1}
    assert cfg.model.moe.capacity_factor == 1.25 and cfg.model.moe_layers == [0, 2]
    assert cfg.data.max_chars_per_domain is None and cfg.model.moe.k == 4
    assert apply_overrides(RunConfig(), ["--model.moe_layers", "2"]).model.moe_layers == 2
    assert apply_overrides(RunConfig(), ["--model.moe_layers", "all"]).model.moe_layers == "all"


@pytest.mark.parametrize("args, match", [
    (["--train.stepz", "3"], "unknown config key.*valid keys of train: steps"),
    (["--moe.nope", "3"], "valid keys of model.moe:.*num_experts"),
    (["--foo.bar", "1"], "model, moe, data, train"),
    (["--train.steps", "ten"], "train.steps='ten' is not valid; expected int"),
    (["--model.tie_embeddings", "maybe"], "choose one of: true, false"),
    (["--moe.router_kwargs", "{bad"], "expected JSON"),
    (["--train.steps"], "expected --SECTION.FIELD VALUE"),
])
def test_bad_overrides(args, match):
    with pytest.raises(MoelabError, match=match):
        apply_overrides(RunConfig(), args)


@pytest.mark.parametrize("args, match", [
    (["--train.dtype", "float16"], "train.dtype='float16' is not valid; choose one of: 'float32', 'bfloat16'"),
    (["--train.steps", "0"], "train.steps"),
    (["--moe.aux_loss", "magic"], "choose one of: 'none', 'switch'"),
    (["--moe.k", "9"], "moe.k"),
    (["--data.tokenizer", "words"], "tokenizer='words' is not valid; choose one of: 'bpe', 'byte'"),
    (["--data.seq_len", "4096"], "model.max_seq_len"),
])
def test_invalid_values_name_choices(args, match):
    with pytest.raises(MoelabError, match=match):
        apply_overrides(RunConfig(), args).validate()


def test_unknown_router_lists_registry():
    from moelab.layers.routers import ROUTERS

    if not len(ROUTERS):
        pytest.skip("no routers registered yet")
    with pytest.raises(MoelabError, match="moe.router='nope' is not valid; choose one of"):
        apply_overrides(RunConfig(), ["--moe.router", "nope"]).validate()


def test_json_round_trip():
    cfg = apply_overrides(preset("tiny"), ["--moe.router_kwargs", '{"a": [1, 2]}', "--model.moe_layers", "[1]"])
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_load_from_files(tmp_path, suffix):
    text = {
        ".toml": '[train]\nsteps = 7\n[moe]\nnum_experts = 4\nrouter_kwargs = {x = 1}\n[model]\nmoe_layers = [0]\n',
        ".yaml": "train:\n  steps: 7\nmoe:\n  num_experts: 4\n  router_kwargs: {x: 1}\nmodel:\n  moe_layers: [0]\n",
        ".json": '{"train": {"steps": 7}, "moe": {"num_experts": 4, "router_kwargs": {"x": 1}}, "model": {"moe_layers": [0]}}',
    }[suffix]
    p = tmp_path / f"c{suffix}"
    p.write_text(text)
    cfg = RunConfig.load(p)
    assert cfg.train.steps == 7 and cfg.model.moe.num_experts == 4
    assert cfg.model.moe.router_kwargs == {"x": 1} and cfg.model.moe_layers == [0]


def test_bad_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsteps = \n")
    with pytest.raises(MoelabError, match="could not be parsed"):
        RunConfig.load(p)
    p2 = tmp_path / "c.toml2"
    p2.write_text("")
    with pytest.raises(MoelabError, match="'.toml', '.yaml'"):
        RunConfig.load(p2)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_valid(name):
    preset(name).validate()


def test_config_keys_cover_sections():
    keys = config_keys()
    assert "moe.router" in keys and "train.steps" in keys and "data.source" in keys and "model.d_model" in keys

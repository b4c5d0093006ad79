"""Import of tiny random HF MoE models of every family: logits equal the HF model's (fp32, <= 1e-5),
for several prompts with right and left padding; the MoE-layer protocol holds; the run directory
loads with load_run and works with eval, generate, analyze and report."""

from __future__ import annotations

import json

import pytest
import torch

from hf_helpers import prompts
from moelab.models.moe_protocol import calibration_hooks, moe_layers

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"]
MOE_BLOCKS = {"deepseek_v3": [1, 2]}  # first_k_dense_replace=1


@pytest.fixture(scope="module")
def imported(hf_folders):
    from moelab.hf import from_pretrained

    return {name: from_pretrained(folder) for name, (folder, _) in hf_folders.items()}


def _logits(model, ids, att, hf=False):
    with torch.no_grad():
        return (model(input_ids=ids, attention_mask=att) if hf else model(ids, attention_mask=att)).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_hf(name, hf_folders, imported):
    _, ref = hf_folders[name]
    ids, att = prompts()
    for rows in ([0, 1, 2], [0], [2, 1]):
        got, want = _logits(imported[name], ids[rows], att[rows]), _logits(ref, ids[rows], att[rows], hf=True)
        assert want.abs().max() > 0.5  # a real signal, not all zeros
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_moe_blocks_are_moelab_layers_with_block_indices(name, imported):
    from moelab.layers.moe import MoELayer

    sites = moe_layers(imported[name])
    assert [s.index for s in sites] == MOE_BLOCKS.get(name, [0, 1])
    assert all(isinstance(s.layer, MoELayer) and s.layer.layer_index == s.index for s in sites)
    seen = []
    ids, att = prompts()
    with calibration_hooks(imported[name], lambda s, x, y: seen.append((s.index, x.shape[0]))):
        _logits(imported[name], ids, att)
    assert seen == [(i, 33) for i in MOE_BLOCKS.get(name, [0, 1])]
    assert int(sites[0].layer.last_routing.valid_T.sum()) == int(att.sum())  # padding reaches the routing context


@pytest.mark.parametrize("name,change", [
    ("mixtral", lambda l: setattr(l.router, "renormalize", False)),
    ("olmoe", lambda l: setattr(l.router, "renormalize", True)),
    ("deepseek_v3", lambda l: l.router.aux_free.bias_E.zero_()),
    ("deepseek_v3", lambda l: setattr(l.router, "route_scale", 1.0)),
    ("gpt_oss", lambda l: setattr(l.experts, "limit", None)),
    ("gpt_oss", lambda l: l.router.bias_E.data.zero_()),
    ("qwen2_moe", lambda l: l.shared_experts.w_sgate_1D.data.zero_()),
])
def test_each_mapped_option_matters(name, change, hf_folders):
    """Negative controls: undoing one part of the mapping breaks equality (the test above can fail)."""
    from moelab.hf import from_pretrained

    folder, ref = hf_folders[name]
    model = from_pretrained(folder)
    with torch.no_grad():
        change(moe_layers(model)[0].layer)
    ids, att = prompts()
    assert (_logits(model, ids, att) - _logits(ref, ids, att, hf=True)).abs().max().item() > 1e-3


def test_in_memory_model_is_converted(hf_folders):
    import transformers as tf

    from moelab.hf import from_pretrained

    folder, ref = hf_folders["qwen3_moe"]
    hf = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = from_pretrained(hf)
    ids, att = prompts()
    assert (_logits(model, ids, att) - _logits(ref, ids, att, hf=True)).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def mixtral_run(hf_folders, tiny_corpus, tmp_path_factory):
    from moelab.hf import import_to_run

    out = tmp_path_factory.mktemp("runs") / "mixtral"
    return import_to_run(hf_folders["mixtral"][0], out, seq_len=32, data_source=str(tiny_corpus))


def test_run_directory_loads_with_load_run(mixtral_run, hf_folders):
    import transformers as tf

    from moelab.train.run import load_run

    run = load_run(mixtral_run)
    cfg = json.loads((mixtral_run / "config.json").read_text())
    assert cfg["hf"]["family"] == "mixtral" and cfg["data"]["tokenizer"] == "pretrained"
    ids, att = prompts()
    want = _logits(hf_folders["mixtral"][1], ids, att, hf=True)
    assert (_logits(run.model, ids, att) - want).abs().max().item() <= 1e-5
    hf_tok = tf.AutoTokenizer.from_pretrained(str(hf_folders["mixtral"][0]))
    text = "def f(x):\n    return x + 1"
    assert run.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert run.tokenizer.decode(run.tokenizer.encode(text)) == text
    assert (run.tokenizer.eos_id, run.tokenizer.bos_id, run.tokenizer.pad_id) == (2, 1, 0)
    out = run.model(ids, labels_BL=ids, valid_BL=att.bool())
    assert torch.isfinite(out.loss) and out.aux_loss is not None


def test_cli_eval_generate_analyze_report_on_imported_run(mixtral_run, capsys):
    from moelab.cli.main import main

    assert main(["eval", str(mixtral_run), "--max-batches", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["per_domain"] and set(res["per_domain"]) <= {"code", "prose"} and res["val_loss"] > 0
    assert main(["generate", str(mixtral_run), "--prompt", "def f", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert main(["analyze", str(mixtral_run), "--windows", "2"]) == 0
    assert (mixtral_run / "analysis" / "trace_step_000000.safetensors").is_file()
    assert main(["report", str(mixtral_run), "--windows", "2"]) == 0
    assert (mixtral_run / "report" / "report.html").is_file()


def test_swap_and_replay_on_imported_model_persist_in_run_dir(hf_folders, tmp_path):
    from hf_helpers import make_tokenizer
    from moelab.hf import from_pretrained, record_routing, replay_routing, save_hf_run, swap_routers
    from moelab.models.hf.tokenizer import from_transformers
    from moelab.train.run import load_run

    folder, _ = hf_folders["deepseek_v3"]
    model = from_pretrained(folder)
    ids, att = prompts()
    with record_routing(model) as rec:
        y0 = model(ids, attention_mask=att).logits
    with replay_routing(model, rec):
        assert torch.equal(model(ids, attention_mask=att).logits, y0)
    swap_routers(model, "softmax_topk")
    hf_tok = make_tokenizer()
    run = save_hf_run(model, from_transformers(hf_tok), tmp_path / "run", hf_tokenizer=hf_tok)
    loaded = load_run(run)
    assert [s.layer.cfg.router for s in moe_layers(loaded.model)] == ["softmax_topk", "softmax_topk"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, attention_mask=att).logits, model(ids, attention_mask=att).logits,
                                   rtol=0, atol=1e-6)


def test_per_expert_and_fused_checkpoints_are_both_read(hf_folders, tmp_path):
    """save_pretrained writes Mixtral per-expert (experts.<e>.w1/w2/w3) and GPT-OSS fused; a Mixtral
    checkpoint written fused (the in-memory layout) imports to the same logits."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from moelab.hf import from_pretrained

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return list(f.keys())

    folder, ref = hf_folders["mixtral"]
    assert any(".experts.0.w1.weight" in k for k in keys(folder))
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys(hf_folders["gpt_oss"][0]))
    fused = shutil.copytree(folder, tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys(fused))
    ids, att = prompts()
    got = _logits(from_pretrained(fused), ids, att)
    assert (got - _logits(ref, ids, att, hf=True)).abs().max().item() <= 1e-5

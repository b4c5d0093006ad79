"""Export: a moelab MoETransformer to Mixtral / Qwen2-MoE folders that plain transformers loads with
equal logits; unexportable routers are refused with the exportable list; import -> export -> import
is the identity on weights for every family."""

from __future__ import annotations

import pytest
import torch

from moelab.data.corpus import Document
from moelab.data.tokenizer import train_tokenizer
from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer

V = 300


@pytest.fixture(scope="module")
def tok():
    docs = [Document(str(i), "def f(x):\n    return x + %d\nThe fox. " % i, "code") for i in range(50)]
    return train_tokenizer(docs, "bpe", V, use_cache=False)


def _model(seed=0, **moe):
    torch.manual_seed(seed)
    model_kw = {k: moe.pop(k) for k in ("first_k_dense", "tie_embeddings") if k in moe}
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff_dense=40,
                      moe=MoEConfig(d_ff=24, num_experts=4, k=2, **moe), **model_kw)
    m = MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1.0, 0.3)
    return m


def _hf_logits(folder, ids):
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits, hf


CASES = {
    "mixtral": dict(),
    "mixtral_untied": dict(tie_embeddings=False, router_kwargs={"score_order": "topk_then_softmax"}),
    "qwen2_moe_shared": dict(num_shared_experts=1, shared_d_ff=16),
    "qwen2_moe_gated_dense": dict(num_shared_experts=2, shared_expert_gate=True, first_k_dense=1),
    "qwen2_moe_no_renorm": dict(router_kwargs={"renormalize": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_equal_moelab(case, tok, tmp_path):
    from moelab.hf import export_moelab_model

    model = _model(**dict(CASES[case]))
    out = export_moelab_model(model, tmp_path / case, tokenizer=tok)
    ids = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(2))
    got, hf = _hf_logits(out, ids)
    with torch.no_grad():
        want = model(ids).logits
    assert hf.config.model_type == ("mixtral" if case.startswith("mixtral") else "qwen2_moe")
    # moelab builds its rotary tables in float64, transformers in float32: a few fp32 ulps of |logits| ~ 5
    assert (got - want).abs().max().item() <= 3e-5
    assert (got - want).abs().mean().item() <= 1e-6
    assert (out / "tokenizer.json").is_file()


def test_exported_tokenizer_round_trips(tok, tmp_path):
    import transformers as tf

    from moelab.hf import export_moelab_model

    out = export_moelab_model(_model(), tmp_path / "m", tokenizer=tok)
    hf_tok = tf.AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x + 7"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id


@pytest.mark.parametrize("moe,match", [
    (dict(router="top_p"), "router='top_p'"),
    (dict(router="sigmoid_topk"), "router='sigmoid_topk'"),
    (dict(aux_free_bias=True), "aux_free_bias=True"),
    (dict(capacity_factor=1.0), "capacity_factor=1.0"),
    (dict(activation="gelu"), "activation='gelu'"),
])
def test_unexportable_models_are_refused_with_the_exportable_list(moe, match, tmp_path):
    from moelab.hf import export_moelab_model

    with pytest.raises(MoelabError, match=match) as e:
        export_moelab_model(_model(**moe), tmp_path / "x")
    assert "exportable routers: softmax_topk" in str(e.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_import_export_import_is_identity_on_weights(name, hf_folders, tmp_path):
    from moelab.hf import export_imported, from_pretrained

    folder, ref = hf_folders[name]
    first = from_pretrained(folder)
    out = export_imported(first, tmp_path / "exp", tokenizer_dir=folder)
    second = from_pretrained(out)
    a, b = first.state_dict(), second.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    _, hf = _hf_logits(out, torch.zeros(1, 1, dtype=torch.long))
    want = ref.state_dict()
    assert all(torch.equal(hf.state_dict()[k], want[k]) for k in want)
    assert (out / "tokenizer.json").is_file()

"""Export: a moelab model to a folder plain ``transformers`` loads (``AutoModelForCausalLM``, no custom code).

- A moelab-trained ``MoETransformer`` whose routers are softmax top-k: **Mixtral** format when every
  block is MoE, weights are renormalised and there are no shared experts; otherwise **Qwen2-MoE**
  (``mlp_only_layers`` for dense blocks, ``norm_topk_prob`` for the renormalisation, the shared
  experts as its shared expert). Exactness tricks (documented): Qwen2-MoE always gates its shared
  expert with ``sigmoid(w x)``; an ungated moelab shared expert is written with ``w = 0`` and its down
  projection doubled (``0.5 * 2W`` is exact in floating point); a model without shared experts gets
  a width-1 shared expert of zeros; Qwen2-MoE's q/k/v biases are off (``qkv_bias=False``).
- An imported run (``HFMoEModel``): the family's own format (round trip), as long as every MoE
  layer still has the family's router and expert shapes.

Refused, with the list of exportable routers: any other router (top-p, hash, ReLU, sigmoid, ...),
aux-free bias, capacity drops, GELU experts, non-vanilla expert layouts, per-block expert counts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError

EXPORTABLE_ROUTERS = ("softmax_topk (score_order softmax_then_topk or topk_then_softmax, no bias)",)


def _refuse(what: str) -> MoelabError:
    return MoelabError(f"cannot export: {what}; exportable routers: {', '.join(EXPORTABLE_ROUTERS)} "
                       "(and, for an imported model, its own family's router)")


def _prepare_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MoelabError(f"--out={str(out)!r} exists and is not empty; choose another or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- moelab MoETransformer
def _check_moelab(model: nn.Module) -> tuple[Any, bool]:
    """The common MoEConfig of every MoE layer and whether weights are renormalised."""
    cfg = model.cfg
    if not cfg.layout.is_vanilla():
        raise _refuse(f"model.layout.kind={cfg.layout.kind!r} (shared expert pools have no HF format)")
    layers = [layer for _, layer in model.moe_layers()]
    if not layers:
        raise MoelabError("cannot export a dense model: it has no MoE layers")
    c0 = layers[0].cfg
    for layer in layers:
        c = layer.cfg
        if c.router != "softmax_topk" or c.router_kwargs.get("bias"):
            raise _refuse(f"router={c.router!r} with router_kwargs={c.router_kwargs}")
        if c.aux_free_bias or c.capacity_factor is not None or c.activation != "swiglu":
            raise _refuse(f"aux_free_bias={c.aux_free_bias}, capacity_factor={c.capacity_factor}, "
                          f"activation={c.activation!r} (need False, None, 'swiglu')")
        same = ("num_experts", "k", "d_ff", "num_shared_experts", "shared_d_ff", "shared_expert_gate", "router_kwargs")
        if any(getattr(c, f) != getattr(c0, f) for f in same):
            raise _refuse("MoE layers differ in expert count, k, width or router options (no HF family allows it)")
    return c0, bool(layers[0].router.renormalize or layers[0].router.score_order == "topk_then_softmax")


def _common_config(model: nn.Module, c0: Any, tok_ids: dict[str, int]) -> dict[str, Any]:
    m = model.cfg
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, head_dim=m.d_model // m.n_heads,
                max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                tie_word_embeddings=m.tie_embeddings, num_experts_per_tok=c0.k, hidden_act="silu",
                router_aux_loss_coef=c0.aux_loss_coef, initializer_range=m.init_std,
                attention_dropout=0.0, **tok_ids)


def _attn_tensors(model: nn.Module) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.final_norm.weight}
    sd["lm_head.weight"] = model.embed.weight if model.lm_head is None else model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.qkv.weight.chunk(3, dim=0)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": b.attn.o_proj.weight, p + "input_layernorm.weight": b.attn_norm.weight,
                   p + "post_attention_layernorm.weight": b.ffn_norm.weight})
    return sd


def _moe_tensors(layer: nn.Module, p: str, qwen2: bool) -> dict[str, Tensor]:
    ex = layer.experts
    sd = {p + "gate.weight": layer.router.gate.weight_ED,
          p + "experts.gate_up_proj": torch.cat([ex.w_gate_EFD, ex.w_up_EFD], dim=1),
          p + "experts.down_proj": ex.w_down_EDF}
    if not qwen2:
        return sd
    D = layer.cfg.d_model
    sh = layer.shared_experts
    if sh is None:  # a width-1 shared expert of zeros: contributes exactly 0
        z = torch.zeros(1, D)
        sd.update({p + "shared_expert.gate_proj.weight": z, p + "shared_expert.up_proj.weight": z,
                   p + "shared_expert.down_proj.weight": z.T.contiguous(), p + "shared_expert_gate.weight": torch.zeros(1, D)})
        return sd
    gated = sh.w_sgate_1D is not None
    sd.update({p + "shared_expert.gate_proj.weight": sh.w_gate_FD, p + "shared_expert.up_proj.weight": sh.w_up_FD,
               p + "shared_expert.down_proj.weight": sh.w_down_DF if gated else sh.w_down_DF * 2.0,
               p + "shared_expert_gate.weight": sh.w_sgate_1D if gated else torch.zeros(1, D)})
    return sd


def _dense_tensors(block: nn.Module, p: str) -> dict[str, Tensor]:
    g, u = block.ffn.w_gate_up.weight.chunk(2, dim=0)
    return {p + "gate_proj.weight": g, p + "up_proj.weight": u, p + "down_proj.weight": block.ffn.w_down.weight}


def export_moelab_model(model: nn.Module, out: str | Path, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a moelab ``MoETransformer`` as a Mixtral or Qwen2-MoE folder (module docstring)."""
    from moelab.models.hf.convert import transformers_offline

    tf = transformers_offline()
    c0, renorm = _check_moelab(model)
    if c0.num_shared_experts and c0.activation != "swiglu":
        raise _refuse("shared experts must be SwiGLU")
    moe_idx = {i for i, _ in model.moe_layers()}
    mixtral = renorm and not c0.num_shared_experts and moe_idx == set(range(model.cfg.n_layers))
    tok_ids = _token_ids(tokenizer)
    common = _common_config(model, c0, tok_ids)
    if mixtral:
        hf_cfg = tf.MixtralConfig(**common, intermediate_size=c0.d_ff, num_local_experts=c0.num_experts,
                                  sliding_window=None)
    else:
        shared_w = c0.num_shared_experts * (c0.shared_d_ff or c0.d_ff) if c0.num_shared_experts else 1
        hf_cfg = tf.Qwen2MoeConfig(**common, intermediate_size=model.cfg.d_ff_dense, moe_intermediate_size=c0.d_ff,
                                   num_experts=c0.num_experts, shared_expert_intermediate_size=shared_w,
                                   norm_topk_prob=renorm, decoder_sparse_step=1, qkv_bias=False,
                                   mlp_only_layers=sorted(set(range(model.cfg.n_layers)) - moe_idx),
                                   use_sliding_window=False)
    sd = _attn_tensors(model)
    layers = dict(model.moe_layers())
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}.mlp."
        sd.update(_moe_tensors(layers[i], p, not mixtral) if i in layers else _dense_tensors(block, p))
    return _write(tf, hf_cfg, sd, out, overwrite, tokenizer=tokenizer)


def _token_ids(tokenizer: Any) -> dict[str, int]:
    if tokenizer is None:
        return {}
    return {"eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}


def _write(tf: Any, hf_cfg: Any, sd: dict[str, Tensor], out: str | Path, overwrite: bool, *,
           tokenizer: Any = None, tokenizer_dir: Path | None = None) -> Path:
    hf = tf.AutoModelForCausalLM.from_config(hf_cfg)
    want = hf.state_dict()
    missing = sorted(set(want) - set(sd))
    if missing:
        raise MoelabError(f"export is missing tensor {missing[0]} ({len(missing)} missing)")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise MoelabError(f"export produced tensor {extra[0]} that {type(hf).__name__} does not have")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise MoelabError(f"tensor {k} has shape {tuple(v.shape)}; {type(hf).__name__} expects {tuple(want[k].shape)}")
    with torch.no_grad():
        hf.load_state_dict({k: v.detach().to(want[k].dtype) for k, v in sd.items()}, strict=True)
    out = _prepare_out(out, overwrite)
    hf.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name not in ("config.json", "generation_config.json") and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    elif tokenizer is not None:
        _save_tokenizer(tf, tokenizer, out)
    return out


def _save_tokenizer(tf: Any, tokenizer: Any, out: Path) -> None:
    """moelab BPE tokenizer -> PreTrainedTokenizerFast (tokenizer.json + tokenizer_config.json)."""
    if tokenizer.kind == "byte":
        raise MoelabError("the run's byte tokenizer has no Hugging Face equivalent; train with data.tokenizer=bpe")
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_str(tokenizer.to_str())
    name = lambda i: backend.id_to_token(i)  # noqa: E731
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=name(tokenizer.eos_id),
                                      bos_token=name(tokenizer.bos_id), pad_token=name(tokenizer.pad_id))
    fast.save_pretrained(str(out))


# --------------------------------------------------------------------------- imported runs (round trip)
def export_imported(model: nn.Module, out: str | Path, *, tokenizer_dir: Path | None = None,
                    overwrite: bool = False) -> Path:
    """An ``HFMoEModel`` back to its family's format (the inverse of the import mapping)."""
    from moelab.models.hf.convert import transformers_offline
    from moelab.models.hf.families import hf_from_moelab, layer_config

    tf = transformers_offline()
    fresh = tf.AutoModelForCausalLM.from_config(model.hf.config)
    sd: dict[str, Tensor] = {}
    layer_keys: dict[int, dict[str, Tensor]] = {}
    for k, v in model.state_dict().items():
        name = k[len("hf."):]
        parts = name.split(".")
        if len(parts) > 5 and parts[3] == "mlp" and parts[4] == "moe":
            layer_keys.setdefault(int(parts[2]), {})[".".join(parts[5:])] = v
        else:
            sd[name] = v
    for i, layer in model.moe_layers():
        want, _ = layer_config(model.family, fresh.config, fresh.model.layers[i].mlp)
        got = layer.cfg
        for f in ("router", "router_kwargs", "num_experts", "k", "d_ff", "num_shared_experts", "aux_free_bias"):
            if getattr(got, f) != getattr(want, f):
                raise _refuse(f"block {i} has {f}={getattr(got, f)!r}; the {model.family.name} format needs "
                              f"{getattr(want, f)!r}")
        sd.update(hf_from_moelab(model.family, layer_keys[i], f"model.layers.{i}.mlp."))
    return _write(tf, model.hf.config, sd, out, overwrite, tokenizer_dir=tokenizer_dir)


def export_run(run_dir: str | Path, out: str | Path, *, step: int | None = None, overwrite: bool = False) -> Path:
    """``moelab hf export``: a run directory (trained or imported) -> an HF folder with its tokenizer."""
    from moelab.models.hf.model import HFMoEModel
    from moelab.train.run import load_run

    run = load_run(run_dir, step)
    if isinstance(run.model, HFMoEModel):
        return export_imported(run.model, out, tokenizer_dir=Path(run_dir) / "hf", overwrite=overwrite)
    return export_moelab_model(run.model, out, tokenizer=run.tokenizer, overwrite=overwrite)

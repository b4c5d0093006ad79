"""The supported Hugging Face MoE families: how each one's sparse block maps onto a moelab ``MoELayer``.

Read from transformers 5.x's modelling code (``transformers/models/<family>/modeling_<family>.py``);
every family stores its routed experts fused, as 3-D tensors (``experts.gate_up_proj [E, 2F, D]``
with the gate rows first, ``experts.down_proj [E, D, F]``; GPT-OSS: ``gate_up_proj [E, D, 2F]`` with
gate/up interleaved in the last dim and ``down_proj [E, F, D]``). Checkpoints on disk in the older
per-expert layout (``experts.<e>.w1/w2/w3`` or ``gate_proj/up_proj/down_proj``) are converted to the
fused form by transformers itself when it loads the folder, so both are read.

Router semantics (HF -> moelab):

- ``mixtral``: softmax over E, top-k, renormalised -> ``softmax_topk`` (softmax_then_topk, renormalize).
- ``olmoe``, ``qwen3_moe``: as Mixtral, renormalised only when ``norm_topk_prob``.
- ``qwen2_moe``: as Qwen3 plus one shared expert (``shared_expert_intermediate_size``) whose output
  is multiplied by ``sigmoid(shared_expert_gate(x))`` -> ``num_shared_experts=1``, ``shared_expert_gate``.
- ``deepseek_v3``: sigmoid scores; selection on ``scores + e_score_correction_bias`` inside the
  ``topk_group`` best of ``n_group`` groups (group score: sum of its top-2 biased scores); weights =
  the unbiased scores, normalised when ``norm_topk_prob``, times ``routed_scaling_factor``; the
  ``n_shared_experts`` shared experts are one MLP of width ``n * moe_intermediate_size``; the first
  ``first_k_dense_replace`` blocks are dense -> ``sigmoid_topk`` (n_groups, topk_groups, route_scale,
  renormalize) with ``aux_free_bias`` holding the correction bias (DeepSeek-V3's aux-loss-free bias).
- ``gpt_oss``: logits = Linear with bias, top-k of the logits, softmax over the k -> ``softmax_topk``
  (topk_then_softmax, ``bias=True``); experts with biases and the clamped SwiGLU
  (``alpha=swiglu_alpha``, ``limit=swiglu_limit``, ``(up + 1)``) -> ``BiasedExpertBank``.

Choices: the imported layers use ``aux_loss="switch"`` with the HF config's ``router_aux_loss_coef``
(moelab's loss is 1 at balance, HF's is k: the same gradient direction, k times smaller) and
``aux_loss="none"`` for DeepSeek-V3 (aux-free bias instead); HF's Mixtral ``router_jitter_noise``
(training only) is not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig


@dataclass(frozen=True)
class Family:
    """One HF MoE family: ``model_type``, the class name of its sparse block and the attribute
    names of the router and shared expert inside that block."""

    name: str
    block_class: str
    router_attr: str = "gate"
    returns_tuple: bool = False  # GPT-OSS's block returns (hidden, router_scores)
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "MixtralSparseMoeBlock"),
    "olmoe": Family("olmoe", "OlmoeSparseMoeBlock"),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3MoE"),
    "gpt_oss": Family("gpt_oss", "GptOssMLP", router_attr="router", returns_tuple=True),
}
SUPPORTED = tuple(FAMILIES)


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise MoelabError(
            f"model_type={model_type!r} is not a supported Hugging Face MoE architecture; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return FAMILIES[model_type]


def is_sparse_block(family: Family, module: nn.Module) -> bool:
    return type(module).__name__ == family.block_class


# --------------------------------------------------------------------------- HF block -> MoEConfig
def _check_act(hf_cfg: Any) -> None:
    act = getattr(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise MoelabError(f"hidden_act={act!r} is not supported for the experts; moelab's SwiGLU needs 'silu'")


def layer_config(family: Family, hf_cfg: Any, block: nn.Module) -> tuple[MoEConfig, dict[str, Any]]:
    """``(MoEConfig, experts_spec)`` of one HF sparse block; ``experts_spec`` is ``{}`` for the stacked
    ``ExpertBank`` or ``{"kind": "biased", alpha, limit, up_shift}`` for ``BiasedExpertBank``."""
    if family.name != "gpt_oss":
        _check_act(hf_cfg)
    gate = getattr(block, family.router_attr)
    ex = block.experts
    E, D = int(gate.weight.shape[0]), int(gate.weight.shape[1])
    base: dict[str, Any] = dict(
        d_model=D, num_experts=E, k=int(gate.top_k), init_std=float(getattr(hf_cfg, "initializer_range", 0.02)),
        aux_loss="switch", aux_loss_coef=float(getattr(hf_cfg, "router_aux_loss_coef", 0.01) or 0.0),
    )
    spec: dict[str, Any] = {}
    if family.name == "gpt_oss":
        base.update(d_ff=int(ex.intermediate_size), router="softmax_topk",
                    router_kwargs={"score_order": "topk_then_softmax", "bias": True})
        spec = {"kind": "biased", "alpha": float(ex.alpha), "limit": float(ex.limit), "up_shift": 1.0}
    elif family.name == "deepseek_v3":
        base.update(d_ff=int(ex.intermediate_dim), router="sigmoid_topk", aux_loss="none", aux_free_bias=True,
                    router_kwargs={"n_groups": int(gate.num_group), "topk_groups": int(gate.topk_group),
                                   "route_scale": float(gate.routed_scaling_factor),
                                   "renormalize": bool(gate.norm_topk_prob)},
                    num_shared_experts=int(hf_cfg.n_shared_experts), shared_d_ff=int(ex.intermediate_dim))
    else:
        renorm = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral always renormalises
        if base["k"] == 1 and renorm:
            raise MoelabError("num_experts_per_tok=1 with renormalised weights (every weight 1) is not supported")
        base.update(d_ff=int(ex.intermediate_dim), router="softmax_topk",
                    router_kwargs={"score_order": "softmax_then_topk", "renormalize": renorm})
        if family.name == "qwen2_moe":
            base.update(num_shared_experts=1, shared_d_ff=int(block.shared_expert.intermediate_size),
                        shared_expert_gate=True)
    return MoEConfig(**base), spec


# --------------------------------------------------------------------------- weights both ways
def _expect(name: str, t: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(t.shape) != shape:
        raise MoelabError(f"tensor {name} has shape {tuple(t.shape)}; expected {shape}")
    if not bool(torch.isfinite(t).all()):
        raise MoelabError(f"tensor {name} has non-finite values (NaN/inf)")
    return t


def hf_block_tensors(family: Family, block: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The sparse block's tensors by their full HF names (``prefix`` = ``model.layers.<i>.mlp.``)."""
    return {prefix + n: t for n, t in list(block.named_parameters()) + list(block.named_buffers())
            if "rotary" not in n}


def moelab_from_hf(family: Family, sd: dict[str, Tensor], prefix: str, cfg: MoEConfig) -> dict[str, Tensor]:
    """The MoELayer state dict (names relative to the layer) from the block's HF tensors."""
    E, D, Fh = cfg.num_experts, cfg.d_model, cfg.d_ff
    g = lambda n: sd[prefix + n] if prefix + n in sd else _missing(prefix + n)  # noqa: E731
    out: dict[str, Tensor] = {}
    r = family.router_attr
    out["router.gate.weight_ED"] = _expect(prefix + f"{r}.weight", g(f"{r}.weight"), (E, D))
    if family.name == "gpt_oss":
        gu = _expect(prefix + "experts.gate_up_proj", g("experts.gate_up_proj"), (E, D, 2 * Fh))
        gub = _expect(prefix + "experts.gate_up_proj_bias", g("experts.gate_up_proj_bias"), (E, 2 * Fh))
        dn = _expect(prefix + "experts.down_proj", g("experts.down_proj"), (E, Fh, D))
        out.update({
            "router.bias_E": _expect(prefix + "router.bias", g("router.bias"), (E,)),
            "experts.w_gate_EFD": gu[..., ::2].transpose(1, 2), "experts.w_up_EFD": gu[..., 1::2].transpose(1, 2),
            "experts.w_down_EDF": dn.transpose(1, 2), "experts.b_gate_EF": gub[:, ::2],
            "experts.b_up_EF": gub[:, 1::2],
            "experts.b_down_ED": _expect(prefix + "experts.down_proj_bias", g("experts.down_proj_bias"), (E, D)),
        })
        return {k: v.contiguous() for k, v in out.items()}
    gu = _expect(prefix + "experts.gate_up_proj", g("experts.gate_up_proj"), (E, 2 * Fh, D))
    out["experts.w_gate_EFD"], out["experts.w_up_EFD"] = gu[:, :Fh], gu[:, Fh:]
    out["experts.w_down_EDF"] = _expect(prefix + "experts.down_proj", g("experts.down_proj"), (E, D, Fh))
    if family.name == "deepseek_v3":
        out["router.aux_free.bias_E"] = _expect(prefix + "gate.e_score_correction_bias",
                                                g("gate.e_score_correction_bias"), (E,)).float()
        out.update(_shared_from(sd, prefix + "shared_experts.", cfg))
    if family.name == "qwen2_moe":
        out.update(_shared_from(sd, prefix + "shared_expert.", cfg))
        out["shared_experts.w_sgate_1D"] = _expect(prefix + "shared_expert_gate.weight",
                                                   g("shared_expert_gate.weight"), (1, D))
    return {k: v.contiguous() for k, v in out.items()}


def _shared_from(sd: dict[str, Tensor], p: str, cfg: MoEConfig) -> dict[str, Tensor]:
    Fs = cfg.num_shared_experts * (cfg.shared_d_ff or cfg.d_ff)
    D = cfg.d_model
    get = lambda n: sd[p + n] if p + n in sd else _missing(p + n)  # noqa: E731
    return {"shared_experts.w_gate_FD": _expect(p + "gate_proj.weight", get("gate_proj.weight"), (Fs, D)),
            "shared_experts.w_up_FD": _expect(p + "up_proj.weight", get("up_proj.weight"), (Fs, D)),
            "shared_experts.w_down_DF": _expect(p + "down_proj.weight", get("down_proj.weight"), (D, Fs))}


def _missing(name: str) -> Tensor:
    raise MoelabError(f"tensor {name} is missing from the checkpoint")


def hf_from_moelab(family: Family, layer_sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Inverse of :func:`moelab_from_hf`: the HF block's tensors from a MoELayer state dict."""
    s = layer_sd
    r = family.router_attr
    out = {prefix + f"{r}.weight": s["router.gate.weight_ED"]}
    if family.name == "gpt_oss":
        E, Fh, D = s["experts.w_gate_EFD"].shape
        gu = torch.empty(E, D, 2 * Fh, dtype=s["experts.w_gate_EFD"].dtype)
        gu[..., ::2], gu[..., 1::2] = s["experts.w_gate_EFD"].transpose(1, 2), s["experts.w_up_EFD"].transpose(1, 2)
        gub = torch.empty(E, 2 * Fh, dtype=gu.dtype)
        gub[:, ::2], gub[:, 1::2] = s["experts.b_gate_EF"], s["experts.b_up_EF"]
        out.update({prefix + "router.bias": s["router.bias_E"], prefix + "experts.gate_up_proj": gu,
                    prefix + "experts.gate_up_proj_bias": gub,
                    prefix + "experts.down_proj": s["experts.w_down_EDF"].transpose(1, 2).contiguous(),
                    prefix + "experts.down_proj_bias": s["experts.b_down_ED"]})
        return out
    out[prefix + "experts.gate_up_proj"] = torch.cat([s["experts.w_gate_EFD"], s["experts.w_up_EFD"]], dim=1)
    out[prefix + "experts.down_proj"] = s["experts.w_down_EDF"]
    sh = {"deepseek_v3": "shared_experts.", "qwen2_moe": "shared_expert."}.get(family.name)
    if sh is not None:
        out.update({prefix + sh + "gate_proj.weight": s["shared_experts.w_gate_FD"],
                    prefix + sh + "up_proj.weight": s["shared_experts.w_up_FD"],
                    prefix + sh + "down_proj.weight": s["shared_experts.w_down_DF"]})
    if family.name == "deepseek_v3":
        out[prefix + "gate.e_score_correction_bias"] = s["router.aux_free.bias_E"]
    if family.name == "qwen2_moe":
        out[prefix + "shared_expert_gate.weight"] = s["shared_experts.w_sgate_1D"]
    return out

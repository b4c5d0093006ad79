"""Adding adapters to a frozen model, saving/loading them apart from the base, and merging plain LoRA.

- :func:`add_adapters(model, cfg)`: freezes every parameter of ``model``, then replaces each dense FFN
  (found through the dense-FFN seam, :mod:`moelab.ops.upcycle.dense`) by ``ADAPTERS[cfg.adapter]``'s
  adapted FFN, and with ``cfg.attention`` wraps the attention projections in :class:`LoRALinear`.
  Only adapter parameters are trainable.
- :func:`adapter_state_dict` / :func:`save_adapters(model, cfg, dir)` / :func:`load_adapters(model, dir)`:
  ``adapters.safetensors`` holds only the trainable (adapter) tensors; ``adapter.json`` the config.
- :func:`merge_lora(model)`: folds plain-LoRA deltas into the frozen weights and removes the wrappers
  (the merged model computes the same function with the base architecture).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moelab.errors import MoelabError
from moelab.ops.lora.base import ATTENTION_LINEARS, AdapterConfig, AdaptedFFN, LoRALinear
from moelab.ops.lora.lora import LoRADelta
from moelab.ops.lora.registry import ADAPTERS
from moelab.ops.upcycle.dense import dense_ffn_sites, ffn_weights

ADAPTER_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapter.json"


def add_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and add ``cfg.adapter`` to every dense FFN (in place); returns ``model``."""
    cfg.validate()
    build = ADAPTERS.get(cfg.adapter)
    if any(isinstance(m, (AdaptedFFN, LoRALinear)) or hasattr(m, "A_gate_ErD") for m in model.modules()):
        raise MoelabError("this model already has adapters; load the base again (or merge_lora first)")
    sites = dense_ffn_sites(model)
    if not sites:
        raise MoelabError(f"adapter={cfg.adapter!r} adapts dense FFNs; this model has none "
                          "(fine-tune a dense run, e.g. one trained with --model.moe_layers none)")
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    n_blocks = max(s.index for s in sites) + 1
    for s in sites:
        setattr(s.parent, s.attr, build(s.module, cfg, index=s.index, n_blocks=n_blocks).to(ffn_weights(s.module).w_up_FD))
    if cfg.attention:
        _wrap_attention(model, cfg)
    return model


def _wrap_attention(model: nn.Module, cfg: AdapterConfig) -> None:
    adapted = {id(m) for m in model.modules() if isinstance(m, (AdaptedFFN, nn.Module)) and hasattr(m, "base")}
    targets = []
    for parent in model.modules():
        if id(parent) in adapted:
            continue
        for name, child in parent.named_children():
            if name in ATTENTION_LINEARS and isinstance(child, nn.Linear):
                targets.append((parent, name, child))
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha).to(child.weight))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_adapters(model: nn.Module, cfg: AdapterConfig, out: str | Path, extra: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out / ADAPTER_FILE), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps({"adapter": dataclasses.asdict(cfg), **(extra or {})}, indent=2) + "\n")
    return out


def read_adapter_config(path: str | Path) -> AdapterConfig:
    p = Path(path) / ADAPTER_CONFIG
    if not p.is_file():
        raise MoelabError(f"{str(path)!r} has no {ADAPTER_CONFIG} (not an adapter directory)")
    return AdapterConfig(**json.loads(p.read_text())["adapter"])


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapters saved in ``path`` to the (base) ``model`` and load their weights."""
    cfg = read_adapter_config(path)
    add_adapters(model, cfg)
    try:
        tensors = load_file(str(Path(path) / ADAPTER_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on a corrupt file
        raise MoelabError(f"{str(Path(path) / ADAPTER_FILE)!r} is not a readable safetensors file ({e})") from None
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise MoelabError(f"adapter file does not match adapter={cfg.adapter!r} on this model: missing "
                          f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}")
    model.load_state_dict(tensors, strict=False)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every plain-LoRA delta into its frozen weight and unwrap (in place); other adapters raise."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.delta_weight().to(child.base.weight)
                setattr(parent, name, child.base)
            elif isinstance(child, AdaptedFFN):
                setattr(parent, name, _merge_ffn(child))
            elif hasattr(child, "base") and hasattr(child, "router") and not isinstance(child, nn.Linear):
                raise MoelabError(f"merge folds a single LoRA; {type(child).__name__} is a mixture "
                                  "(adapter='lora' only)")
    return model


def _merge_ffn(ffn: AdaptedFFN) -> nn.Module:
    if not all(isinstance(d, LoRADelta) for d in ffn.deltas.values()):
        kinds = sorted({type(d).__name__ for d in ffn.deltas.values()})
        raise MoelabError(f"merge folds a single LoRA; this FFN has {kinds} (adapter='lora' only)")
    w = ffn_weights(ffn.base)
    views = {"gate": w.w_gate_FD, "up": w.w_up_FD, "down": w.w_down_DF}
    for name, d in ffn.deltas.items():
        views[name] += d.delta_weight().to(views[name])
    return ffn.base

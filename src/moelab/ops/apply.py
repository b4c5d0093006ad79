"""Shared surgery and saving for operations on trained MoE models (prune, merge, skip).

Everything goes through the MoE-layer protocol (:mod:`moelab.models.moe_protocol`), so the same code
works on moelab's transformer and on imported models holding ``MoELayer`` blocks.

- :func:`pruned_layer(layer, keep)`: a new layer with only experts ``keep`` (router rows, expert
  weights and every per-expert router buffer sliced; k capped only when ``cap_k``).
- :func:`merged_layer(layer, expert_map, weights)`: a layer of merged experts behind a ``wrapped``
  router that keeps the original router and maps each original expert to its merged expert.
- :func:`layer_overrides(model, base_moe)`: ``ModelConfig.layer_overrides`` describing every MoE
  layer that differs from the base config (what makes the result an ordinary run).
- :func:`save_run(...)`: write the operated model as a run directory atomically (a temporary sibling
  renamed into place; an interrupted operation leaves the source and the target untouched).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.moe_protocol import moe_layers, rebuild_layer, replace_moe_layer

OPS_MANIFEST = "ops_manifest.json"


# --------------------------------------------------------------------------- layer surgery
def check_k(k: int, n_keep: int, block: int, cap_k: bool) -> int:
    """k after keeping ``n_keep`` experts: unchanged, capped when ``cap_k``, else a clear error."""
    if n_keep >= k:
        return k
    if cap_k:
        return n_keep
    raise MoelabError(f"keeping {n_keep} experts in block {block} is fewer than its k={k}; keep at least {k} "
                      "experts or pass cap_k=True (--cap-k) to lower k to the experts left")


def _slice_state(sd: dict[str, Tensor], keep_K: Tensor, E: int) -> dict[str, Tensor]:
    out = {}
    for name, t in sd.items():
        per_expert = name.split(".")[0] in ("router", "experts") and t.dim() >= 1 and t.shape[0] == E
        out[name] = t[keep_K].clone() if per_expert else t.clone()
    return out


def pruned_layer(layer: nn.Module, keep: list[int], *, block: int = 0, cap_k: bool = False,
                 router_kwargs: dict | None = None) -> nn.Module:
    """``layer`` with only the experts ``keep`` (in that order); see the module docstring."""
    E = layer.cfg.num_experts
    if getattr(layer.router, "expert_map_B", None) is not None:
        raise MoelabError(f"block {block} has merged experts (router 'wrapped' with an expert_map); "
                          "prune before merging")
    keep_K = torch.as_tensor(sorted(set(int(i) for i in keep)), dtype=torch.long)
    if keep_K.numel() == 0 or keep_K.min() < 0 or keep_K.max() >= E:
        raise MoelabError(f"keep={list(keep)!r} must name experts in [0, {E}) of block {block}")
    k = check_k(layer.cfg.k, int(keep_K.numel()), block, cap_k)
    changes: dict[str, Any] = {"num_experts": int(keep_K.numel()), "k": k}
    if router_kwargs is not None:
        changes["router_kwargs"] = router_kwargs
    new = rebuild_layer(layer, **changes)
    try:
        new.load_state_dict(_slice_state(layer.state_dict(), keep_K, E))
    except RuntimeError as e:
        raise MoelabError(f"router {layer.cfg.router!r} of block {block} cannot be pruned ({e})") from None
    return new


def merged_layer(layer: nn.Module, expert_map: list[int], weights: dict[str, Tensor]) -> nn.Module:
    """A layer of ``E' = max(expert_map) + 1`` merged experts (``weights``: ``w_up_EFD``, ``w_down_EDF``,
    ``w_gate_EFD`` stacked over merged experts) behind a ``wrapped`` router around ``layer.router``."""
    cfg = layer.cfg
    E_new = int(max(expert_map)) + 1
    if cfg.router == "wrapped":
        raise MoelabError("the layer's router is already 'wrapped' (merged or skipped); merge the original model")
    kwargs = {"base": cfg.router, "base_kwargs": dict(cfg.router_kwargs), "base_experts": cfg.num_experts,
              "expert_map": [int(m) for m in expert_map]}
    new = rebuild_layer(layer, num_experts=E_new, k=cfg.k, router="wrapped", router_kwargs=kwargs)
    new.router.base.load_state_dict(layer.router.state_dict())
    with torch.no_grad():
        for name, w in weights.items():
            getattr(new.experts, name).copy_(w)
        if layer.shared_experts is not None:
            new.shared_experts.load_state_dict(layer.shared_experts.state_dict())
    return new


def expert_weights(layer: nn.Module) -> dict[str, Tensor]:
    """The stacked weights of ``layer.experts`` (detached, float64 copies): name -> ``[E, ...]``."""
    ex = layer.experts
    names = ["w_up_EFD", "w_down_EDF"] + (["w_gate_EFD"] if getattr(ex, "w_gate_EFD", None) is not None else [])
    return {n: getattr(ex, n).detach().double().clone() for n in names}


def replace_layers(model: nn.Module, new_layers: dict[int, nn.Module]) -> nn.Module:
    for index, layer in new_layers.items():
        replace_moe_layer(model, index, layer)
    return model


# --------------------------------------------------------------------------- configs and sizes
def layer_overrides(model: nn.Module, base: MoEConfig) -> dict[str, dict[str, Any]]:
    """``{block: {field: value}}`` for every MoE layer whose config differs from ``base``."""
    out = {}
    for site in moe_layers(model):
        cfg = site.layer.cfg
        diff = {f.name: getattr(cfg, f.name) for f in fields(MoEConfig)
                if f.name != "d_model" and getattr(cfg, f.name) != getattr(base, f.name)}
        if diff:
            out[str(site.index)] = diff
    return out


def expert_counts(model: nn.Module) -> dict[int, int]:
    return {s.index: s.layer.cfg.num_experts for s in moe_layers(model)}


def param_counts(model: nn.Module, experts_per_token: dict[int, float] | None = None) -> dict[str, int]:
    """``total`` and ``active`` parameters. Active counts each layer's routed experts at
    ``experts_per_token[block]`` (measured; default its k) experts per token."""
    total = sum(p.numel() for p in model.parameters())
    routed, active_routed = 0, 0.0
    for site in moe_layers(model):
        n = sum(p.numel() for p in site.layer.experts.parameters())
        ept = site.layer.cfg.k if experts_per_token is None else experts_per_token.get(site.index, site.layer.cfg.k)
        routed += n
        active_routed += n * ept / site.layer.cfg.num_experts
    return {"total": int(total), "active": int(round(total - routed + active_routed))}


# --------------------------------------------------------------------------- saving
def save_run(src_run_dir: str | Path, model: nn.Module, run_cfg, step: int, out_dir: str | Path,
             manifest: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``model`` as a run directory ``out_dir`` (config with ``layer_overrides``, tokenizer, data
    manifest, one checkpoint at ``step`` with a fresh optimizer state and the source's data position,
    ``ops_manifest.json``), atomically."""
    from moelab.train import checkpoint as ckpt
    from moelab.train.trainer import CKPT_DIR, CONFIG_FILE, MANIFEST_FILE, TOKENIZER_FILE, build_optimizer

    src, out = Path(src_run_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise MoelabError(f"out={str(out)!r} is the source run; choose another directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MoelabError(f"out={str(out)!r} already exists and is not empty; pass --overwrite to replace it")
    src_state = json.loads((ckpt.find_checkpoint(src / CKPT_DIR, step) / "state.json").read_text())
    overrides = layer_overrides(model, run_cfg.model.layer_moe_config())
    cfg = replace(run_cfg, model=replace(run_cfg.model, layer_overrides=overrides))
    cfg.validate()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        cfg.save(tmp / CONFIG_FILE)
        for name in (TOKENIZER_FILE, MANIFEST_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        extra = {k: src_state[k] for k in ("data", "tokens_seen", "lr", "schedule") if k in src_state}
        ckpt.save_checkpoint(tmp / CKPT_DIR, step, model, build_optimizer(model, cfg.train), extra,
                             rng=src_state.get("rng"))
        (tmp / OPS_MANIFEST).write_text(json.dumps({"source": str(src), "step": step, **manifest}, indent=2,
                                                   default=_json_default))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")

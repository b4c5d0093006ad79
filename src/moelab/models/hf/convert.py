"""Import: a local Hugging Face MoE checkpoint (or an in-memory HF model) -> :class:`HFMoEModel`.

Never touches the network: every ``transformers`` call passes ``local_files_only=True`` and
``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set before ``transformers`` is imported; a hub name
instead of a folder is refused with the command to download it first. A checkpoint whose router or
expert tensors are missing or mis-shaped is refused naming the tensor (never randomly initialised).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.hf.families import (
    FAMILIES, SUPPORTED, family_of, hf_block_tensors, is_sparse_block, layer_config, moelab_from_hf,
)
from moelab.models.hf.model import HFMoEModel, build_layer, decoder_layers

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def transformers_offline() -> Any:
    """``import transformers`` with the offline switches set (no network, ever)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise MoelabError("Hugging Face import/export needs the 'transformers' package: pip install 'moelab[hf]'") from e
    return transformers


def check_folder(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and its parsed config.json; clear errors for everything else."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_NAME.match(str(path)):
            raise MoelabError(
                f"path={str(path)!r} is not a local folder; it looks like a Hugging Face hub name. moelab never "
                f"downloads: run `huggingface-cli download {path} --local-dir DIR` first and pass DIR")
        raise MoelabError(f"path={str(path)!r} does not exist; expected a folder written by save_pretrained")
    if not p.is_dir():
        raise MoelabError(f"path={str(p)!r} is a file; expected a Hugging Face checkpoint folder (config.json + weights)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise MoelabError(f"folder {str(p)!r} is not a Hugging Face checkpoint: config.json is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise MoelabError(f"{cfg_file} is not valid JSON: {e}") from None
    check_model_type(cfg, str(cfg_file))
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise MoelabError(f"folder {str(p)!r} has no weights; expected one of: {', '.join(WEIGHT_FILES)}")
    return p, cfg


def check_model_type(cfg: dict[str, Any], where: str) -> str:
    mt = cfg.get("model_type")
    if mt in FAMILIES:
        return mt
    if mt is not None and not any(cfg.get(k) for k in _MOE_KEYS):
        raise MoelabError(f"{where}: model_type={mt!r} is a dense model (no MoE blocks); import needs an MoE "
                          f"model of: {', '.join(SUPPORTED)}")
    return family_of(str(mt)).name  # raises: unsupported, naming the supported ones


_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every safetensors file of the checkpoint (headers only)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else (
        ["model.safetensors"] if (folder / "model.safetensors").is_file() else [])
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
            raise MoelabError(f"weights file {str(folder / name)!r} is not readable safetensors: {e}") from None
    return shapes


def check_expert_tensors(shapes: dict[str, tuple[int, ...]], num_experts: int | None) -> None:
    """Per-expert checkpoints: every expert 0..E-1 present for each tensor, all of one shape."""
    groups: dict[tuple[str, str], dict[int, tuple[int, ...]]] = {}
    for k, shape in shapes.items():
        m = _PER_EXPERT.match(k)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = shape
    for (pre, suf), by_e in sorted(groups.items()):
        E = num_experts or max(by_e) + 1
        for e in range(E):
            if e not in by_e:
                raise MoelabError(f"tensor {pre}.{e}.{suf} is missing from the checkpoint (expected {E} experts)")
        common = max(set(by_e.values()), key=list(by_e.values()).count)
        for e, shape in sorted(by_e.items()):
            if shape != common:
                raise MoelabError(f"tensor {pre}.{e}.{suf} has shape {shape}; the other experts' is {common}")


def load_hf_folder(folder: Path, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` offline, refusing missing or mis-shaped tensors."""
    cfg = json.loads((folder / "config.json").read_text())
    check_expert_tensors(checkpoint_shapes(folder), next((cfg[k] for k in _MOE_KEYS if cfg.get(k)), None))
    tf = transformers_offline()
    try:
        model, info = tf.AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as e:
        hit = re.search(r"destined for (\S+)", str(e))
        where = f" (tensor {hit.group(1)})" if hit else _first_mismatch(tf, folder)
        raise MoelabError(f"transformers could not load {str(folder)!r}{where}: {_short(e)}") from None
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if bad:
        raise MoelabError(f"checkpoint {str(folder)!r}: tensor {bad[0]} is missing or mis-shaped "
                          f"({len(bad)} tensors: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})")
    return model


def _first_mismatch(tf: Any, folder: Path) -> str:
    """`` (tensor X has shape S; the model expects S0)`` for the first checkpoint tensor of the wrong shape."""
    try:
        with torch.device("meta"):
            want = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(str(folder), local_files_only=True))
        expected = {k: tuple(v.shape) for k, v in want.state_dict().items()}
    except Exception:  # noqa: BLE001 - best effort: the caller's message stands alone
        return ""
    for k, shape in sorted(checkpoint_shapes(folder).items()):
        if k in expected and expected[k] != shape:
            return f" (tensor {k} has shape {shape}; the model expects {expected[k]})"
    return ""


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return " ".join(s[:6])[:800]


def from_pretrained(path_or_model: Any, *, dtype: torch.dtype | str = torch.float32) -> HFMoEModel:
    """A local HF folder or an HF model object -> :class:`HFMoEModel` (eval mode).

    An HF model object is converted in place (its sparse blocks are replaced)."""
    if isinstance(path_or_model, nn.Module):
        hf = path_or_model
        check_model_type(hf.config.to_dict(), type(hf).__name__)
    else:
        folder, _ = check_folder(path_or_model)
        hf = load_hf_folder(folder, _dtype(dtype))
    return convert(hf).eval()


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise MoelabError(f"dtype={dtype!r} is not valid; choose one of: {', '.join(names)}")
    return names[dtype]


def convert(hf: nn.Module) -> HFMoEModel:
    """Replace every sparse block of ``hf`` by a ``MoELayer`` holding the same weights."""
    family = family_of(hf.config.model_type)
    specs: dict[int, dict[str, Any]] = {}
    layers = []
    for i, block in enumerate(decoder_layers(hf)):
        mlp = getattr(block, "mlp", None)
        if mlp is None or not is_sparse_block(family, mlp):
            continue
        cfg, spec = layer_config(family, hf.config, mlp)
        prefix = f"model.layers.{i}.mlp."
        sd = moelab_from_hf(family, hf_block_tensors(family, mlp, prefix), prefix, cfg)
        layer = build_layer(cfg, spec)
        _load_layer(layer, sd, prefix)
        layer.to(dtype=next(mlp.parameters()).dtype)
        if layer.router.aux_free is not None:
            layer.router.aux_free.float()
        specs[i] = {"moe": cfg.to_dict(), "experts": spec}
        layers.append((i, layer))
    if not layers:
        raise MoelabError(f"{type(hf).__name__} has no sparse MoE blocks (a dense model); nothing to import")
    model = HFMoEModel(hf, family, specs)
    for i, layer in layers:
        model.install(i, layer)
    return model


def _load_layer(layer: nn.Module, sd: dict[str, torch.Tensor], prefix: str) -> None:
    want = {k: v.shape for k, v in layer.state_dict().items()}
    for k, shape in want.items():
        if k not in sd:
            raise MoelabError(f"tensor for {prefix}{k} is missing (moelab layer parameter {k})")
        if sd[k].shape != shape:
            raise MoelabError(f"tensor for {prefix}{k} has shape {tuple(sd[k].shape)}; expected {tuple(shape)}")
    with torch.no_grad():
        layer.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)

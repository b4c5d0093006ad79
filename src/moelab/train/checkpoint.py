"""Checkpoints: safetensors weights and optimizer state, a JSON state, written atomically.

Layout of ``RUN/checkpoints/step_000100/``:
    model.safetensors      the model's state_dict
    optimizer.safetensors  every tensor of the optimizer state (key ``"{param_index}.{name}"``)
    state.json             step, sha256 of both safetensors files, the optimizer's param groups and
                           non-tensor state, RNG states (torch, python, numpy, cuda), the data
                           stream position, and whatever else the trainer passes in ``extra``.

Writing: everything goes to a temporary folder next to the final one, every file is fsync'ed, the
folder is renamed into place and the parent fsync'ed, so a crash or an error while saving leaves
the previous checkpoints intact and never a half-written ``step_*`` folder. Loading verifies both
checksums and refuses a corrupted or truncated checkpoint with a message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moelab.errors import MoelabError

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
CKPT_FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of the finished checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p))
    return sorted(out)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), python and numpy, as JSON-able values."""
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if torch.is_tensor(x):
        return x.tolist()
    return x


# --------------------------------------------------------------------------- optimizer state


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                other.setdefault(str(idx), {})[name] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "state": other}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, st in meta["state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
    *,
    keep_last: int | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically; then keep only the newest ``keep_last``.

    ``rng`` defaults to the current RNG states (pass a snapshot to save an earlier moment).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        optim_meta = None
        if optimizer is not None:
            opt_tensors, optim_meta = _split_optimizer_state(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
        state = {
            "format_version": CKPT_FORMAT_VERSION,
            "step": step,
            "sha256": {MODEL_FILE: sha256_file(tmp / MODEL_FILE)},
            "optimizer": optim_meta,
            "rng": rng if rng is not None else rng_state(),
            **(extra or {}),
        }
        if optimizer is not None:
            state["sha256"][OPTIM_FILE] = sha256_file(tmp / OPTIM_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(_jsonable(state)))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = None
        if final.exists():  # re-saving a step: move the old copy aside first
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, p in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_checkpoint(path: str | Path, *, with_optimizer: bool = True) -> tuple[dict, dict | None, dict]:
    """``(model_state_dict, optimizer_state_dict or None, state)`` after verifying the checksums.

    Raises MoelabError naming the checkpoint when a file is missing, truncated or does not match
    its recorded sha256.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        sums = state["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoelabError(f"checkpoint {str(path)!r} is corrupted or incomplete: cannot read {STATE_FILE} ({e})") from None
    files = [MODEL_FILE] + ([OPTIM_FILE] if with_optimizer and OPTIM_FILE in sums else [])
    for name in files:
        f = path / name
        if not f.is_file():
            raise MoelabError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
        got = sha256_file(f)
        if got != sums.get(name):
            raise MoelabError(
                f"checkpoint {str(path)!r} is corrupted: sha256 of {name} is {got[:16]}..., "
                f"expected {str(sums.get(name))[:16]}...; refusing to load it"
            )
    model_sd = load_file(str(path / MODEL_FILE))
    optim_sd = None
    if with_optimizer and OPTIM_FILE in sums:
        optim_sd = _join_optimizer_state(load_file(str(path / OPTIM_FILE)), state["optimizer"])
    return model_sd, optim_sd, state


def find_checkpoint(root: str | Path, step: int | None = None) -> Path:
    """The folder of checkpoint ``step`` (None: the newest) under ``root``; MoelabError if absent."""
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise MoelabError(f"no checkpoints in {str(root)!r}")
    if step is None:
        return ckpts[-1][1]
    for s, p in ckpts:
        if s == step:
            return p
    raise MoelabError(f"step={step!r} is not valid; choose one of the saved steps: {', '.join(str(s) for s, _ in ckpts)}")

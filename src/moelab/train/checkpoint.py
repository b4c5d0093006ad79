"""Checkpoints: safetensors weights and optimizer state, a JSON state, written atomically.

Layout of ``RUN/checkpoints/step_000100/``:
    model.safetensors      the model's state_dict
    optimizer.safetensors  every tensor of the optimizer state (key ``"{param_index}.{name}"``)
    state.json             step, sha256 of both safetensors files, the optimizer's param groups and
                           non-tensor state, RNG states (torch, python, numpy, cuda), the data
                           stream position, and whatever else the trainer passes in ``extra``.

Writing: everything goes to a temporary folder next to the final one, every file is fsync'ed, the
folder is renamed into place and the parent fsync'ed, so a crash or an error while saving leaves
the previous checkpoints intact and never a half-written ``step_*`` folder. Non-finite weights or
optimizer state are refused before anything is written (a diverged model never rotates a good
checkpoint out). Old checkpoints are rotated out by renaming them to ``.del-*`` first, so a crash
while deleting never leaves a half-deleted ``step_*`` folder; :func:`clean_stale` removes the
leftovers (``.tmp-*``, ``.old-*``, ``.del-*`` of processes that are gone).

Loading verifies the sha256 of both safetensors files and of ``state.json`` itself (key
``state_sha256``, over the canonical JSON of the rest), checks that the recorded step matches the
folder name, and refuses a corrupted, truncated or edited checkpoint with a message naming it.
:func:`read_newest_valid` falls back to the newest checkpoint that passes these checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moelab.errors import MoelabError

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
CKPT_FORMAT_VERSION = 2  # 2: state.json carries ``state_sha256`` (version 1 checkpoints load unchecked)
STALE_PREFIXES = (".tmp-", ".old-", ".del-")


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
    require_finite: bool = True,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically; then keep only the newest ``keep_last``.

    ``rng`` defaults to the current RNG states (pass a snapshot to save an earlier moment).
    ``require_finite``: refuse (MoelabError naming the tensor) weights or optimizer state with NaN/inf.
    """
    root = Path(root)
    if require_finite:
        check_finite(model, optimizer, step)
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
        state = _jsonable(state)
        state["state_sha256"] = state_digest(state)
        (tmp / STATE_FILE).write_text(json.dumps(state))
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
            remove_checkpoint(p)
    return final


def remove_checkpoint(path: Path) -> None:
    """Rename ``path`` out of the ``step_*`` namespace, then delete it (a crash leaves only ``.del-*``)."""
    doomed = path.parent / f".del-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier save in this process that failed hard)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: str | Path) -> list[str]:
    """Delete ``.tmp-*``/``.old-*``/``.del-*`` folders under ``root`` left by processes that are gone.

    Returns the names removed. A folder whose writer is still running (its pid is the name's last
    part) is kept.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if not p.name.startswith(STALE_PREFIXES):
            continue
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def state_digest(state: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``state`` without its own ``state_sha256`` key."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
    """MoelabError naming the first weight or optimizer tensor with NaN/inf (nothing is saved then)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MoelabError(f"refusing to save checkpoint step={step}: weight {name!r} has non-finite values "
                              "(NaN/inf); the earlier checkpoints are kept")
    for idx, st in (optimizer.state_dict()["state"].items() if optimizer is not None else ()):
        for key, t in st.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MoelabError(f"refusing to save checkpoint step={step}: optimizer state {idx}.{key} has "
                                  "non-finite values (NaN/inf); the earlier checkpoints are kept")


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
    _check_state(path, state)
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


def _check_state(path: Path, state: dict[str, Any]) -> None:
    """The state's own checksum (format >= 2) and its step against the folder name."""
    recorded = state.get("state_sha256")
    if recorded is None and state.get("format_version", 1) >= 2:
        raise MoelabError(f"checkpoint {str(path)!r} is corrupted: {STATE_FILE} has no state_sha256")
    if recorded is not None and recorded != state_digest(state):
        raise MoelabError(f"checkpoint {str(path)!r} is corrupted or was edited: the sha256 of {STATE_FILE} does "
                          "not match its recorded state_sha256; refusing to resume from it (not exact)")
    name = path.name
    if name.startswith("step_") and name[5:].isdigit() and state.get("step") != int(name[5:]):
        raise MoelabError(f"checkpoint {str(path)!r} is corrupted: {STATE_FILE} says step={state.get('step')!r}, "
                          f"the folder name says {int(name[5:])}")


def read_newest_valid(root: str | Path, *, with_optimizer: bool = True,
                      warn: Callable[[str], None] | None = None) -> tuple[Path, tuple[dict, dict | None, dict]] | None:
    """``(folder, read_checkpoint(folder))`` of the newest checkpoint that verifies; None if there is none.

    Each corrupt newer checkpoint is reported through ``warn`` and skipped. MoelabError when
    checkpoints exist but none of them verifies (naming each and why).
    """
    found = list_checkpoints(root)
    reasons = []
    for _, path in reversed(found):
        try:
            return path, read_checkpoint(path, with_optimizer=with_optimizer)
        except MoelabError as e:
            reasons.append(str(e))
            if warn is not None:
                warn(f"warning: {e}; falling back to an older checkpoint")
    if reasons:
        raise MoelabError(f"no valid checkpoint under {str(root)!r}: " + "; ".join(reasons))
    return None


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(sd)`` with a MoelabError naming the tensors that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} is {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"tensor {shapes[0]}" + (f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else "")] if shapes else []
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}")
        raise MoelabError(f"checkpoint {str(source)!r} does not fit the model of the run's config.json "
                          f"(a model of other shapes): {'; '.join(parts)}")
    model.load_state_dict(sd)


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

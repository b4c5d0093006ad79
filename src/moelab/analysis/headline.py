"""What a report leads with: the ten-second summary of a run, the config differences that matter
(from the nearest preset, or between compared runs), and small helpers that keep plots honest
(is a series informative at all?) and tokens legible (visible whitespace)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# keys whose value is bookkeeping, not an experimental choice
_IGNORED = ("data.source", "data.cache_dir", "model.vocab_size", "train.device", "train.threads",
            "train.log", "train.log_every", "train.progress")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"moe": {"k": 2}}}`` -> ``{"model.moe.k": 2}`` (lists and empty dicts are values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def short_key(key: str) -> str:
    """``model.moe.k`` -> ``moe.k`` (the form the command line takes)."""
    return key.removeprefix("model.") if key.startswith(("model.moe.", "model.layout.")) else key


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's value, b's value)}`` for every flattened key whose values differ."""
    fa, fb = flatten(a), flatten(b)
    keys = [k for k in dict.fromkeys([*fa, *fb]) if k not in _IGNORED]
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}


def nearest_preset(config: dict[str, Any]) -> tuple[str | None, dict[str, tuple[Any, Any]]]:
    """The preset with the fewest differing keys, and the differences ``{key: (run, preset)}``."""
    try:
        from moelab.train.presets import PRESETS, preset
    except ImportError:
        return None, {}
    best: tuple[str | None, dict] = (None, {})
    for name in sorted(PRESETS):
        try:
            diff = config_diff(config, preset(name).to_dict())
        except Exception:  # noqa: BLE001 -- a preset that cannot be built here is just not a candidate
            continue
        if best[0] is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Keys (flattened) whose value is not the same in every config, in first-seen order."""
    flats = [flatten(c) for c in configs]
    keys = [k for k in dict.fromkeys(k for f in flats for k in f) if k not in _IGNORED]
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def run_label(name: str, config: dict[str, Any], keys: list[str], limit: int = 3) -> str:
    """``name (moe.router=sigmoid_topk, train.lr=0.001)``: the run's values of the keys that differ."""
    flat = flatten(config)
    parts = [f"{short_key(k)}={flat.get(k)}" for k in keys[:limit]]
    more = f", +{len(keys) - limit}" if len(keys) > limit else ""
    return f"{name} ({', '.join(parts)}{more})" if parts else name


def budget_warnings(names: list[str], configs: list[dict], summaries: list[dict], metrics: list[list[dict]]) -> list[str]:
    """One line for each of tokens, steps and data that are not the same in every compared run."""
    def last_tokens(ms: list[dict]) -> Any:
        return next((r["tokens"] for r in reversed(ms) if isinstance(r.get("tokens"), int)), None)

    facts = {
        "training tokens": [last_tokens(m) for m in metrics],
        "steps": [s.get("step", flatten(c).get("train.steps")) for s, c in zip(summaries, configs)],
        "data": [(flatten(c).get("data.source"), flatten(c).get("data.seed"), flatten(c).get("data.tokenizer"))
                 for c in configs],
    }
    out = []
    for what, vals in facts.items():
        if len({repr(v) for v in vals}) > 1:
            shown = ", ".join(f"{n}: {_short(v)}" for n, v in zip(names, vals))
            out.append(f"The runs differ in {what} ({shown}): their numbers are not a like-for-like comparison.")
    return out


def _short(v: Any) -> str:
    if isinstance(v, tuple):
        return "/".join(str(x) for x in v)
    return f"{v:,}" if isinstance(v, int) else str(v)


def is_informative(values: Any) -> bool:
    """False for a series that carries no information: all NaN, or constant (a flat dropped fraction,
    a fixed experts-per-token, a zero bias norm)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return arr.size > 0 and float(arr.max() - arr.min()) > 1e-9 * max(1.0, float(np.abs(arr).max()))


def constant_value(values: Any) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr[0]) if arr.size else None


_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible_whitespace(text: str) -> str:
    """A token's text with its whitespace drawn (``" def"`` -> ``"␣def"``), other controls escaped."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif not ch.isprintable():
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def smooth(values: Any, window: int | None = None) -> np.ndarray:
    """A centred-free trailing exponential moving average (TensorBoard-style, debiased), for noisy curves."""
    y = np.asarray(values, dtype=np.float64)
    if y.size == 0:
        return y
    alpha = 2.0 / ((window or max(2, y.size // 20)) + 1)
    out, acc, weight = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def fmt_num(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{float(x):.{nd}g}" if isinstance(x, float) else str(x)

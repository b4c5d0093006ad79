"""Run-level drivers: load a run, calibrate it on its own data, apply one operation, save the result.

``prune_run(src, out, PruneConfig, CalibrationConfig)`` / ``merge_run`` / ``skip_run`` read the source
run (never written), and write ``out`` atomically as an ordinary run directory
(:func:`moelab.ops.apply.save_run`). ``method_family(name)`` says which registry a method name is in;
names accept ``-`` for ``_`` (``hc-smoe`` = ``hc_smoe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moelab.errors import MoelabError
from moelab.models.moe_protocol import require_moe
from moelab.ops.apply import expert_counts, param_counts, save_run
from moelab.ops.calibrate import CalibrationConfig, CalibrationWindows, calibrate, calibration_windows, text_windows
from moelab.ops.merge import MERGE_METHODS, MergeConfig, merge_model
from moelab.ops.prune import PRUNE_CRITERIA, PruneConfig, plan_pruning, prune_model
from moelab.ops.skip import SKIP_METHODS, SkipConfig, skip_model


def canonical(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def method_family(name: str) -> str:
    """"prune", "merge" or "skip" for a method name; MoelabError listing all names otherwise."""
    n = canonical(name)
    for fam, reg in (("prune", PRUNE_CRITERIA), ("merge", MERGE_METHODS), ("skip", SKIP_METHODS)):
        if n in reg:
            return fam
    names = PRUNE_CRITERIA.names() + MERGE_METHODS.names() + SKIP_METHODS.names()
    raise MoelabError(f"method={name!r} is not valid; choose one of: {', '.join(names)}")


@dataclass
class OpsContext:
    """A loaded run, its prepared data and the calibration sample."""

    loaded: Any
    prepared: Any
    windows: CalibrationWindows


def open_run(run_dir: str | Path, ccfg: CalibrationConfig, *, step: int | None = None,
             calib_file: str | None = None) -> OpsContext:
    """Load ``run_dir`` (CPU), prepare its data, draw the calibration sample (or read ``calib_file``)."""
    from moelab.data import prepare_data
    from moelab.train.run import load_run

    ccfg.validate()
    loaded = load_run(run_dir, step)
    require_moe(loaded.model, "this operation")
    if not loaded.config.model.layout.is_vanilla():
        raise MoelabError(f"model.layout.kind={loaded.config.model.layout.kind!r}: operations on experts need the "
                          "vanilla per-layer layout (per-layer expert counts persist through layer_overrides)")
    prepared = prepare_data(loaded.config.data)
    if calib_file is not None:
        p = Path(calib_file)
        if not p.is_file():
            raise MoelabError(f"calib_file={calib_file!r} does not exist")
        L = ccfg.seq_len or loaded.config.data.seq_len
        windows = text_windows([p.read_text(errors="replace")], loaded.tokenizer, L, ccfg.tokens)
    else:
        windows = calibration_windows(loaded.config, prepared, ccfg)
    return OpsContext(loaded, prepared, windows)


def apply_op(model: nn.Module, family: str, method: str, keep: float | int, ctx: OpsContext,
             stats: dict | None, ccfg: CalibrationConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply one method to ``model`` in place (``stats``: calibration of the unmodified model)."""
    extra = dict(extra or {})
    m = canonical(method)
    if family == "skip":
        rate = extra.pop("rate", None)
        rate = (1.0 - float(keep)) if rate is None else float(rate)
        return skip_model(model, ctx.windows, SkipConfig(method=m, rate=rate, batch_size=ccfg.batch_size, **extra))
    stats = stats if stats is not None else calibrate(model, ctx.windows, ccfg)
    if family == "prune":
        pcfg = PruneConfig(criterion=m, keep=keep, **extra)
        plan = plan_pruning(model, stats, pcfg, ctx.windows.domains)
        return prune_model(model, plan, pcfg)
    return merge_model(model, stats, MergeConfig(method=m, keep=keep, options=extra.get("options")))


def run_op(src: str | Path, out: str | Path, family: str, method: str, keep: float | int,
           ccfg: CalibrationConfig, *, extra: dict[str, Any] | None = None, overwrite: bool = False,
           step: int | None = None, calib_file: str | None = None) -> dict[str, Any]:
    """Load, calibrate, operate, save ``out``; returns the manifest written to ops_manifest.json."""
    reg = {"prune": PRUNE_CRITERIA, "merge": MERGE_METHODS, "skip": SKIP_METHODS}[family]
    if canonical(method) not in reg:
        raise MoelabError(f"method={method!r} is not a {family} method; choose one of: {', '.join(reg.names())}")
    if Path(out).resolve() == Path(src).resolve():
        raise MoelabError(f"out={str(out)!r} is the source run; choose another directory")
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise MoelabError(f"out={str(out)!r} already exists and is not empty; pass --overwrite to replace it")
    ctx = open_run(src, ccfg, step=step, calib_file=calib_file)
    model = ctx.loaded.model
    before = {"experts": expert_counts(model), **param_counts(model)}
    manifest = apply_op(model, family, method, keep, ctx, None, ccfg, extra)
    ept = {int(k): v for k, v in manifest.get("experts_per_token", {}).items()} or None
    manifest.update(before=before, after={"experts": expert_counts(model), **param_counts(model, ept)},
                    calibration={**vars(ccfg), "tokens_used": ctx.windows.tokens, "domains": ctx.windows.domains,
                                 "calib_file": calib_file})
    save_run(src, model, ctx.loaded.config, ctx.loaded.step, out, manifest, overwrite=overwrite)
    return manifest


__all__ = ["OpsContext", "apply_op", "canonical", "method_family", "open_run", "run_op"]

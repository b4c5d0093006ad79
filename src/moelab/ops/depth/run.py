"""``depth_route(src, out, DepthConfig)``: load a run, add and fit depth routers, score both models, save ``out``.

``out`` is an ordinary run directory (``moelab.ops.apply.save_run``) whose ``config.json`` carries
``model.depth`` (what rebuilds the routers on load) and whose checkpoint holds the routers' weights;
``out/depth_route.{md,json}`` hold the table and what the search / training found; ``ops_manifest.json``
the same summary. The source run is never written.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.errors import MoelabError
from moelab.ops.depth.base import DEPTH_METHODS, DepthConfig, Windows, make_windows


def _train_windows(run, cfg: DepthConfig) -> Windows:
    w = make_windows(run, "train", cfg.train_windows, seed=cfg.seed)
    n = min(cfg.train_windows, w.ids_NL.shape[0])
    return Windows(w.ids_NL[:n], w.prompt_len, w.domains[:n])


def apply_depth(model, cfg: DepthConfig, train: Windows) -> tuple[dict, dict]:
    """Install the method's routers in ``model`` and fit them; returns (spec, fit info)."""
    from moelab.models.depth import check_applies, install_depth

    cfg.validate()
    check_applies(model, cfg.method)
    method = DEPTH_METHODS.get(cfg.method)()
    spec = method.spec(model, cfg)
    torch.manual_seed(cfg.seed)
    install_depth(model, spec)
    model.cfg = replace(model.cfg, depth=spec)
    info = method.fit(model, train, cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return spec, info


def _static_rows(model, evals: Windows, info: dict, cfg: DepthConfig) -> list:
    """Dr.LLM: the search's best fixed configuration for every input (a static layer-drop baseline) on ``evals``."""
    from moelab.models.depth import forcing
    from moelab.ops.depth.evaluate import score

    conf = info.get("best_static_config")
    if conf is None:
        return []
    with forcing(model, dict(enumerate(conf))):
        return [score(model, evals, f"static {''.join(map(str, conf))} (best fixed config of the search)", cfg.batch_size)]


def depth_route(src: str | Path, out: str | Path, cfg: DepthConfig, *, overwrite: bool = False,
                step: int | None = None, progress: bool = True) -> tuple[dict[str, Any], str]:
    from moelab.ops.apply import save_run
    from moelab.ops.depth.evaluate import score, table, to_dict
    from moelab.train.run import load_run

    cfg.validate()
    if Path(out).resolve() == Path(src).resolve():
        raise MoelabError(f"out={str(out)!r} is the source run; choose another directory")
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise MoelabError(f"out={str(out)!r} already exists and is not empty; pass --overwrite to replace it")
    run = load_run(src, step)
    from moelab.models.depth import check_applies

    check_applies(run.model, cfg.method)
    evals = make_windows(run, "test", cfg.eval_windows, seed=cfg.seed)
    base = score(run.model, evals, "unmodified", cfg.batch_size)
    spec, info = apply_depth(run.model, cfg, _train_windows(run, cfg))
    routed = score(run.model, evals, f"{cfg.method} (budget {cfg.budget:g})", cfg.batch_size)
    results = [base, routed] + _static_rows(run.model, evals, info, cfg)
    md = table(results)
    unit = DEPTH_METHODS.get(cfg.method).budget_unit
    manifest = {"op": "depth-route", "method": cfg.method, "budget": cfg.budget, "budget_unit": unit,
                "config": vars(cfg), "spec": spec, "fit": info,
                "results": [to_dict(r, base) for r in results], "eval_windows": evals.ids_NL.shape[0]}
    run_cfg = replace(run.config, model=replace(run.config.model, depth=spec))
    save_run(src, run.model, run_cfg, run.step, out, manifest, overwrite=overwrite)
    (Path(out) / "depth_route.json").write_text(json.dumps(manifest, indent=1, default=str))
    (Path(out) / "depth_route.md").write_text(md + "\n")
    return manifest, md

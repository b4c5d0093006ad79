"""Cross-validated hyperparameters for model routers, on the training split only.

Each router class may declare ``cv_grid = {option: [values, ...]}``. :func:`tune_router` splits the
training prompts into ``folds`` folds (by hash of the prompt, or of its source/category when the
comparison groups by those), fits every grid point on the other folds, sweeps it on the held-out
fold and keeps the grid point with the best mean AIQ (RouterBench's, single models included). The
test split is never touched. Options the user fixed are excluded from the grid.

Choice: the prompt features are those of the featurizer fitted on the whole training split (one
TF-IDF fit instead of one per fold), so the folds share the vocabulary; the scores and costs the
routers learn from are strictly per fold.
"""

from __future__ import annotations

import itertools

import numpy as np

from moelab.errors import MoelabError, check_range
from moelab.route.base import MODEL_ROUTERS
from moelab.route.data import RoutingDataset, prompt_hash


def fold_ids(ds: RoutingDataset, folds: int, seed: int = 0, group_by: str = "prompt") -> np.ndarray:
    keys = {"prompt": [t if t else f"id:{p}" for p, t in zip(ds.prompt_ids, ds.texts)],
            "source": ds.sources, "category": ds.categories}[group_by]
    return np.minimum((np.array([prompt_hash(f"cv{seed}:{k}") for k in keys]) * folds).astype(int), folds - 1)


def _grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def _fold_aiq(cls, opts, tr, va, x_tr, x_va) -> float:
    from moelab.route.evaluate import _metrics, sweep

    r = cls(**opts).fit(tr, x_ND=x_tr if cls.needs_features else None)
    sw = sweep(r, va, x_va if cls.needs_features else None)
    return float(_metrics(sw, va, np.full((va.n_prompts, 1), 1.0 / va.n_prompts), None)["aiq"][0])


def tune_router(name: str, train: RoutingDataset, x_ND: np.ndarray | None, fixed: dict | None = None,
                folds: int = 3, seed: int = 0, group_by: str = "prompt") -> dict:
    """``{"chosen": {option: value}, "grid": ..., "cv_aiq": {point: mean AIQ}, "folds": n}``."""
    check_range("cv_folds", folds, low=2)
    cls = MODEL_ROUTERS.get(name)
    fixed = dict(fixed or {})
    grid = {k: list(v) for k, v in (getattr(cls, "cv_grid", None) or {}).items() if k not in fixed}
    out = {"chosen": {}, "grid": grid, "cv_aiq": {}, "folds": folds}
    if not grid:
        out["note"] = "no CV grid: defaults or given options" if not fixed else "all grid options fixed by the user"
        return out
    f_N = fold_ids(train, folds, seed, group_by)
    if len(set(f_N.tolist())) < folds:
        out["note"] = f"fewer than {folds} non-empty folds with group_by={group_by!r}: defaults kept"
        return out
    points = _grid_points(grid)
    scores = []
    for pt in points:
        vals = []
        for f in range(folds):
            tr_i, va_i = np.flatnonzero(f_N != f), np.flatnonzero(f_N == f)
            xt = None if x_ND is None else x_ND[tr_i]
            xv = None if x_ND is None else x_ND[va_i]
            vals.append(_fold_aiq(cls, {**fixed, **pt}, train.subset(tr_i), train.subset(va_i), xt, xv))
        scores.append(float(np.mean(vals)))
        out["cv_aiq"][", ".join(f"{k}={v}" for k, v in pt.items())] = scores[-1]
    if not scores:
        raise MoelabError(f"router {name!r}: empty CV grid {grid}")
    out["chosen"] = points[int(np.argmax(scores))]  # ties: the first grid point
    return out

"""The evaluation's own noise: a bootstrap over evaluation windows.

A validation loss is a token-weighted mean over a finite set of windows, so it carries sampling
error of its own, apart from seed-to-seed variation. :func:`bootstrap_se` resamples the windows
with replacement (``n_boot`` times, a fixed seed) and returns the standard deviation of the
resampled token-weighted mean loss: the standard error that comparing two runs on *these* windows
cannot remove. Every run of a fair sweep evaluates on the same windows, so paired differences
cancel most of it; the leaderboard reports it so a reader can see whether the evaluation set is
large enough for the differences of interest (Efron & Tibshirani 1993, ch. 6).
"""

from __future__ import annotations

import numpy as np


def bootstrap_se(nll_W, count_W, *, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of ``sum(nll_W) / sum(count_W)`` over windows W (NaN if < 2 windows)."""
    nll = np.asarray(nll_W, dtype=float)
    cnt = np.asarray(count_W, dtype=float)
    keep = cnt > 0
    nll, cnt = nll[keep], cnt[keep]
    if nll.size < 2:
        return float("nan")
    idx_BW = np.random.default_rng(seed).integers(0, nll.size, size=(n_boot, nll.size))
    means_B = nll[idx_BW].sum(1) / cnt[idx_BW].sum(1)
    return float(means_B.std(ddof=1))

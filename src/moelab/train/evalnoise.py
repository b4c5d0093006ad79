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


def paired_bootstrap_se(a_windows, b_windows, *, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error, over evaluation windows, of the mean over seeds of the paired difference
    ``loss(A_s) - loss(B_s)``; ``a_windows``/``b_windows``: per seed ``(nll_W, count_W)`` on the SAME
    windows. Windows are resampled jointly for every run (the evaluation set is common to all of them),
    so this is the evaluation's own noise in a comparison, which the spread over seeds does not contain."""
    runs = [(np.asarray(n, float), np.asarray(c, float)) for n, c in (*a_windows, *b_windows)]
    sizes = {n.size for n, _ in runs} | {c.size for _, c in runs}
    if len(a_windows) != len(b_windows) or not a_windows or len(sizes) != 1 or sizes.pop() < 2:
        return float("nan")
    nll_RW = np.stack([n for n, _ in runs])
    cnt_RW = np.stack([c for _, c in runs])
    idx_BW = np.random.default_rng(seed).integers(0, nll_RW.shape[1], size=(n_boot, nll_RW.shape[1]))
    loss_BR = nll_RW[:, idx_BW].sum(2).T / np.maximum(cnt_RW[:, idx_BW].sum(2).T, 1)
    k = len(a_windows)
    diff_B = (loss_BR[:, :k] - loss_BR[:, k:]).mean(1)
    return float(diff_B.std(ddof=1))

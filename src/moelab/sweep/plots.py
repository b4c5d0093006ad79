"""Figures of a sweep leaderboard (matplotlib, Agg backend): loss curves overlaid, quality vs active
compute, quality vs balance. Okabe-Ito colours (as the analysis reports); every axis is labelled.
Each configuration is one colour; curves are the mean over seeds (steps every seed logged)."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _style(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "linestyle": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def _point_style(i: int) -> dict[str, Any]:
    """Colour and marker of configuration i: the marker shifts by one every 8 colours, so no two of
    the first 64 configurations look alike."""
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[(i + i // len(OKABE_ITO)) % len(MARKERS)]}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # tight: the legend below is kept whole
    plt.close(fig)
    return buf.getvalue()


def _axes(w: float = 7.5, h: float = 4.2):
    return plt.subplots(figsize=(w, h))


def _legend(ax, n: int) -> None:
    """Below the axes (under the x label), never over the data; up to 3 columns."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, max(1, n)), frameon=False)
    ax.grid(alpha=0.3)


MIN_REL_SPAN = 0.1  # an axis of positive counts spans at least 10% of its centre value


def pad_relative(ax, axis: str, lo: float, hi: float, min_rel: float = MIN_REL_SPAN) -> None:
    """Widen ``axis`` so that a data range [lo, hi] narrower than ``min_rel`` of its centre stays
    small on the plot: a 0.3% difference in active parameters then covers 3% of the axis, not all
    of it (matplotlib's autoscale stretches any range to the whole axis)."""
    c, span = (lo + hi) / 2, hi - lo
    if not (math.isfinite(c) and c != 0) or span >= min_rel * abs(c):
        return
    half = max(0.55 * span, min_rel * abs(c) / 2)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(c - half, c + half)


def _count_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.3g}M" if abs(v) >= 1e5 else f"{v:,.0f}"))


def _mean_curve(curves: list[tuple[list[int], list[float]]], smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    common = None
    for steps, _ in curves:
        common = set(steps) if common is None else common & set(steps)
    xs = np.array(sorted(common or []))
    if xs.size == 0:
        return xs, xs
    ys = np.mean([np.array([dict(zip(s, v))[x] for x in xs], dtype=float) for s, v in curves], axis=0)
    if smooth > 1 and ys.size > smooth:
        kernel = np.ones(smooth) / smooth
        ys = np.convolve(ys, kernel, mode="valid")
        xs = xs[smooth - 1:]
    return xs, ys


CURVES = (  # key, file, y label, title, smoothing, caption (what to look for)
    ("train_curve", "sweep_train_loss.png", "training loss (nats/token)", "Training loss (mean over seeds, smoothed)",
     10, "Lower is better; 10-step moving average. Curves that cross late mean the ranking depends on the token "
         "budget; a curve still falling steeply at the end was not trained to convergence."),
    ("val_curve", "sweep_val_loss.png", "validation loss (nats/token)", "Validation loss (mean over seeds)", 1,
     "Lower is better; every run is evaluated on the same validation tokens, and the last point of each line is "
     "the value in the leaderboard."),
)
SCATTERS = (  # x key, file, x label, title, caption
    ("params_active", "sweep_quality_vs_active.png", "active parameters per token",
     "Quality vs active compute (95% interval across seeds)",
     "Down is better. The x axis spans at least ±5% of the mean, so configurations a fraction of a percent apart "
     "in active parameters stand on (nearly) one vertical line: equal compute per token."),
    ("load_cv", "sweep_quality_vs_balance.png", "load CV (std/mean of expert load; 0 = balanced)",
     "Quality vs load balance (95% interval across seeds)",
     "Down is better, left is more balanced: a point below and left of another is better on both; a trade-off "
     "shows as points along a line from top-left to bottom-right."),
)


def build_figures(lb: Any) -> list[tuple[str, Any, str]]:
    """(file name, matplotlib figure, caption) of each figure with something drawn."""
    figs: list[tuple[str, Any, str]] = []
    metric_label = "validation perplexity" if lb.metric == "val_ppl" else "validation loss (nats/token)"
    for key, fname, ylabel, title, smooth, cap in CURVES:
        fig, ax = _axes()
        drawn = 0
        for i, g in enumerate(lb.groups):
            xs, ys = _mean_curve([getattr(r, key) for r in g.runs], smooth=smooth)
            if xs.size:
                ax.plot(xs, ys, label=g.group, linewidth=1.3, marker="o" if xs.size < 8 else None, markersize=3,
                        **_style(i))
                drawn += 1
        _finish(figs, fig, ax, fname, "training step", ylabel, title, drawn, cap)
    for xkey, fname, xlabel, title, cap in SCATTERS:
        fig, ax = _axes()
        xs = []
        for i, g in enumerate(lb.groups):
            sx, sy = g.stats.get(xkey), g.stats.get(lb.metric)
            if sx is None or sy is None or not math.isfinite(sx.mean):
                continue
            xerr = sx.half_width if sx.n > 1 and math.isfinite(sx.half_width) else None
            yerr = sy.half_width if sy.n > 1 and math.isfinite(sy.half_width) else None
            ax.errorbar([sx.mean], [sy.mean], xerr=None if xerr is None else [xerr],
                        yerr=None if yerr is None else [yerr], **_point_style(i), linestyle="none", capsize=3, label=g.group)
            xs += [sx.mean - (xerr or 0), sx.mean + (xerr or 0)]
        if xkey == "params_active" and xs:
            pad_relative(ax, "x", min(xs), max(xs))
            _count_axis(ax)
        _finish(figs, fig, ax, fname, xlabel, metric_label, title, len(xs) // 2, cap)
    return figs


def leaderboard_figures(lb: Any) -> list[tuple[str, bytes, str]]:
    """(file name, PNG bytes, caption) of each figure."""
    return [(f, _png(fig), cap) for f, fig, cap in build_figures(lb)]


def _finish(figs: list, fig, ax, fname: str, xlabel: str, ylabel: str, title: str, drawn: int, caption: str) -> None:
    """Label the axes; keep the figure if anything was drawn, else close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:
        _legend(ax, drawn)
        figs.append((fname, fig, caption))
    else:
        plt.close(fig)

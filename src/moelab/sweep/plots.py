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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _axes(w: float = 7.5, h: float = 4.2):
    fig, ax = plt.subplots(figsize=(w, h))
    fig.subplots_adjust(left=0.9 / w, right=1 - 2.6 / w, bottom=0.6 / h, top=1 - 0.45 / h)
    return fig, ax


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)


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


def leaderboard_figures(lb: Any) -> list[tuple[str, bytes, str]]:
    figs: list[tuple[str, bytes, str]] = []
    metric_label = "validation perplexity" if lb.metric == "val_ppl" else "validation loss (nats/token)"

    # loss curves
    for key, fname, ylabel, title, smooth in (
            ("train_curve", "sweep_train_loss.png", "training loss (nats/token)", "Training loss (mean over seeds, smoothed)", 10),
            ("val_curve", "sweep_val_loss.png", "validation loss (nats/token)", "Validation loss (mean over seeds)", 1)):
        fig, ax = _axes()
        drawn = 0
        for i, g in enumerate(lb.groups):
            xs, ys = _mean_curve([getattr(r, key) for r in g.runs], smooth=smooth)
            if xs.size:
                ax.plot(xs, ys, label=g.group, linewidth=1.3, marker="o" if xs.size < 8 else None, markersize=3,
                        **_style(i))
                drawn += 1
        _finish(figs, fig, ax, fname, "training step", ylabel, title, drawn)

    # quality vs active compute, quality vs balance
    for xkey, fname, xlabel, title in (
            ("params_active", "sweep_quality_vs_active.png", "active parameters per token",
             "Quality vs active compute (95% interval across seeds)"),
            ("load_cv", "sweep_quality_vs_balance.png", "load CV (std/mean of expert load; 0 = balanced)",
             "Quality vs load balance (95% interval across seeds)")):
        fig, ax = _axes()
        drawn = 0
        for i, g in enumerate(lb.groups):
            sx, sy = g.stats.get(xkey), g.stats.get(lb.metric)
            if sx is None or sy is None or not math.isfinite(sx.mean):
                continue
            xerr = sx.half_width if sx.n > 1 and math.isfinite(sx.half_width) else None
            yerr = sy.half_width if sy.n > 1 and math.isfinite(sy.half_width) else None
            ax.errorbar([sx.mean], [sy.mean], xerr=None if xerr is None else [xerr],
                        yerr=None if yerr is None else [yerr], marker=MARKERS[i % len(MARKERS)],
                        color=OKABE_ITO[i % len(OKABE_ITO)], linestyle="none", capsize=3, label=g.group)
            drawn += 1
        _finish(figs, fig, ax, fname, xlabel, metric_label, title, drawn)
    return figs


def _finish(figs: list, fig, ax, fname: str, xlabel: str, ylabel: str, title: str, drawn: int) -> None:
    """Label the axes; keep the figure (as PNG) if anything was drawn, else close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn:
        _legend(ax)
        figs.append((fname, _png(fig), title))
    else:
        plt.close(fig)

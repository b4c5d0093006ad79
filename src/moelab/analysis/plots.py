"""Figures of routing analyses (matplotlib, Agg backend; nothing is shown on screen).

Colours: the Okabe-Ito palette for lines and bars and ``cividis`` for heatmaps, both readable
with the common colour-vision deficiencies. Every axis carries a label. Each function returns a
``matplotlib.figure.Figure``; ``png_bytes(fig)`` renders and closes it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
LINESTYLES = ["-", "--", "-.", ":"]
HEATMAP_CMAP = "cividis"


def style(i: int) -> dict[str, Any]:
    """Colour and line style of series i (the style cycles after the 8 colours, so lines stay distinct)."""
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "linestyle": LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]}


def png_bytes(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # no bbox_inches="tight": it draws twice (slow on CPU)
    plt.close(fig)
    return buf.getvalue()


def _single(figsize: tuple[float, float]):
    """One axis with fixed margins that leave room for the axis labels (no layout engine: faster)."""
    fig, ax = plt.subplots(figsize=figsize)
    w, h = figsize
    fig.subplots_adjust(left=0.9 / w, right=1 - 0.25 / w, bottom=0.6 / h, top=1 - 0.45 / h)
    return fig, ax


def _grid(n: int, w: float = 3.6, h: float = 3.0, max_cols: int = 4):
    cols = min(max_cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    # fixed margins instead of a layout engine (constrained/tight layout doubles the render time)
    fig.subplots_adjust(left=0.9 / (w * cols), right=1 - 0.35 / cols, bottom=0.2 / rows + 0.03, top=1 - 0.1 / rows,
                        wspace=0.45, hspace=0.55)
    return fig, list(axes.flat[:n])


def loss_curves(metrics: Sequence[dict], evals: Sequence[dict], title: str = "Loss") -> Any:
    """Training loss (and LM loss) per step, validation loss per evaluation (+ per domain)."""
    fig, ax = _single((7, 4))
    i = 0
    for key, label in (("loss", "train loss"), ("lm_loss", "train LM loss")):
        pts = [(r["step"], r[key]) for r in metrics if isinstance(r.get(key), (int, float))]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, label=label, **style(i), linewidth=1.2)
            i += 1
    pts = [(r["step"], r["val_loss"]) for r in evals if isinstance(r.get("val_loss"), (int, float))]
    if pts:
        x, y = zip(*pts)
        ax.plot(x, y, marker="o", label="val loss", **style(i))
        i += 1
    doms = sorted({d for r in evals for d in (r.get("per_domain") or {})})
    for d in doms:
        pts = [(r["step"], r["per_domain"][d]["loss"]) for r in evals if d in (r.get("per_domain") or {})]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker=".", label=f"val loss: {d}", **style(i), alpha=0.8)
            i += 1
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    if i:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def trajectory(steps, values_SL, layer_ids: Sequence[int], ylabel: str, title: str) -> Any:
    """One line per MoE layer of a per-layer statistic over training steps."""
    fig, ax = _single((7, 3.6))
    v = np.asarray(values_SL, dtype=float)
    for j, l in enumerate(layer_ids):
        ok = np.isfinite(v[:, j])
        ax.plot(np.asarray(steps)[ok], v[ok, j], label=f"layer {l}", **style(j), linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def _index_ticks(axis, n: int) -> None:
    """Integer ticks on an expert axis: every index up to 16, else at most 9 integer positions."""
    from matplotlib.ticker import MaxNLocator

    if n <= 16:
        axis.set_ticks(range(n))
    else:
        axis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    axis.set_tick_params(labelsize=8)


def load_heatmaps(per_layer: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> Any:
    """Per layer, the share of routed slots of each expert over training (``(layer, steps, shares_SE)``)."""
    fig, axes = _grid(len(per_layer))
    for ax, (layer, steps, f) in zip(axes, per_layer):
        im = ax.imshow(f.T, aspect="auto", cmap=HEATMAP_CMAP, interpolation="nearest",
                       extent=(float(steps[0]), float(steps[-1]), f.shape[1] - 0.5, -0.5), vmin=0)
        ax.set_xlabel("training step")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}", fontsize=10)
        _index_ticks(ax.yaxis, f.shape[1])
        fig.colorbar(im, ax=ax, label="share of slots")
    return fig


def matrix_heatmaps(mats: Sequence[tuple[str, np.ndarray]], xlabel: str, ylabel: str, cbar: str,
                    xticklabels: Sequence[str] | None = None, vmin: float | None = 0, vmax: float | None = None) -> Any:
    """A grid of heatmaps (expert x domain, co-activation, router-router cosine, ...)."""
    fig, axes = _grid(len(mats))
    for ax, (title, m) in zip(axes, mats):
        im = ax.imshow(m, aspect="auto", cmap=HEATMAP_CMAP, interpolation="nearest", vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _index_ticks(ax.yaxis, m.shape[0])
        if xticklabels is None:
            _index_ticks(ax.xaxis, m.shape[1])
        else:
            ax.set_xticks(range(len(xticklabels)))
            long = len(xticklabels) > 4 or max(map(len, xticklabels)) > 8
            ax.set_xticklabels(xticklabels, rotation=30 if long else 0, ha="right" if long else "center", fontsize=8)
        fig.colorbar(im, ax=ax, label=cbar)
    return fig


def per_layer_bars(layer_ids: Sequence[int], series: dict[str, Sequence[float]], ylabel: str, title: str,
                   ylim: tuple[float, float] | None = None) -> Any:
    """Grouped bars: one group per MoE layer, one bar per named series."""
    fig, ax = _single((max(7, 1.2 * len(layer_ids) + 3), 3.6))
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(layer_ids))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        ax.bar(x + (i - (n - 1) / 2) * width, np.nan_to_num(v), width, label=name, color=OKABE_ITO[i % 8])
    ax.set_xticks(x)
    ax.set_xticklabels([str(l) for l in layer_ids])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:  # headroom above the bars for the legend
        ax.set_ylim(ylim[0], ylim[0] + 1.25 * (ylim[1] - ylim[0]))
    ax.legend(fontsize=8, ncol=min(3, n), loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    return fig


def series_by_step(xs: Sequence[int], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str,
                   ylim: tuple[float, float] | None = None) -> Any:
    fig, ax = _single((7, 3.6))
    for i, (name, ys) in enumerate(series.items()):
        y = np.array([np.nan if a is None else a for a in ys], dtype=float)
        ax.plot(xs, y, marker="o", label=name, **style(i))
    ax.set_xticks(list(xs))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def per_expert_bars(per_layer: Sequence[tuple[int, np.ndarray]], ylabel: str, title: str,
                    xlabel: str = "expert") -> Any:
    fig, axes = _grid(len(per_layer))
    for ax, (layer, v) in zip(axes, per_layer):
        v = np.asarray(v, dtype=float)
        ax.bar(np.arange(v.size), np.nan_to_num(v), color=OKABE_ITO[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"layer {layer}: {title}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return fig


def experts_vs_loss(per_layer: Sequence[tuple[int, dict]]) -> Any:
    """Mean token loss against the number of experts the token used (variable-k routers)."""
    fig, ax = _single((7, 3.6))
    for i, (layer, r) in enumerate(per_layer):
        ax.plot(r["k_values"], r["mean_loss"], marker="o", label=f"layer {layer} (rho={r['spearman']:.2f})",
                **style(i))
    ax.set_xlabel("experts used by the token")
    ax.set_ylabel("mean token loss (nats)")
    ax.set_title("Experts per token vs token loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def overlay_curves(runs: Sequence[tuple[str, Sequence[int], Sequence[float]]], xlabel: str, ylabel: str,
                   title: str, smooth: Any = None) -> Any:
    """Several runs' curves on one axis (``moelab compare``). With ``smooth`` (a function of the values),
    each run is drawn smoothed, its raw curve faint behind it in the same colour."""
    fig, ax = _single((7, 4))
    for i, (name, x, y) in enumerate(runs):
        if not len(x):
            continue
        if smooth is not None:
            ax.plot(x, y, color=style(i)["color"], alpha=0.2, linewidth=0.8)
            y = smooth(y)
        ax.plot(x, y, label=name, **style(i), linewidth=1.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig

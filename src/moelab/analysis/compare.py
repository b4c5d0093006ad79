"""`moelab compare RUN...`: several runs side by side (one table, overlaid curves; HTML and markdown).

Values come from each run's summary.json (balance there is the mean over MoE layers and the last
50 steps); a value missing there falls back to the last record of eval.jsonl (validation loss/ppl,
per domain) or to metrics.jsonl (tokens/s: median over steps; balance: mean over MoE layers of the
last logged step).

Runs are labelled by what differs between their configs (``run (moe.router=..., train.lr=...)``), and
the page and the markdown open with a warning when the runs' training tokens, steps or data differ.
Train-loss curves are smoothed (debiased EMA) over their raw values drawn faint.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import headline as H
from moelab.analysis import plots as P
from moelab.analysis.analyses import load_run_records
from moelab.analysis.report import CSS, table_html
from moelab.errors import MoelabError


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        cur: Any = d
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None


def _num(x: Any, default: Any) -> Any:
    return x if isinstance(x, (int, float)) else default


@dataclass
class RunRow:
    name: str
    run_dir: Path
    val_loss: float | None
    val_ppl: float | None
    per_domain: dict[str, dict[str, float]]
    load_cv: float | None
    load_max_over_mean: float | None
    params_active: int | None
    params_total: int | None
    tokens_per_s: float | None
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)


def summarize_run(run_dir: str | Path, name: str | None = None) -> RunRow:
    run_dir = Path(run_dir)
    config, metrics, evals, summary = load_run_records(run_dir)
    last_eval = evals[-1] if evals else {}
    per_domain = _first(summary, "per_domain", "val_per_domain") or last_eval.get("per_domain") or {}
    last_layers = next((r["layers"] for r in reversed(metrics) if r.get("layers")), [])

    def layer_mean(key: str) -> float | None:
        v = [x[key] for x in last_layers if isinstance(x.get(key), (int, float))]
        return float(np.mean(v)) if v else None

    tps = _first(summary, "tokens_per_s", "train_tokens_per_s", "throughput.tokens_per_s")
    if tps is None:
        v = [r["tokens_per_s"] for r in metrics if isinstance(r.get("tokens_per_s"), (int, float))]
        tps = float(np.median(v)) if v else None
    val_loss = _first(summary, "val_loss", "val.loss")
    if val_loss is None:
        val_loss = last_eval.get("val_loss")
    val_ppl = _first(summary, "val_ppl", "val.ppl")
    if val_ppl is None:
        val_ppl = last_eval.get("val_ppl", math.exp(val_loss) if isinstance(val_loss, (int, float)) else None)
    curves = {
        "train loss": ([r["step"] for r in metrics if "loss" in r], [r["loss"] for r in metrics if "loss" in r]),
        "val loss": ([r["step"] for r in evals if "val_loss" in r], [r["val_loss"] for r in evals if "val_loss" in r]),
    }
    steps = [r["step"] for r in metrics if r.get("layers")]
    cv = [np.nanmean([x.get("load_cv", np.nan) for x in r["layers"]]) for r in metrics if r.get("layers")]
    curves["mean load CV"] = (steps, [float(c) for c in cv])
    return RunRow(
        name=name or run_dir.name, run_dir=run_dir, val_loss=val_loss, val_ppl=val_ppl, per_domain=per_domain,
        load_cv=_num(summary.get("load_cv"), layer_mean("load_cv")),
        load_max_over_mean=_num(summary.get("load_max_over_mean"), layer_mean("load_max_over_mean")),
        params_active=_first(summary, "params_active", "params.active", "active_params"),
        params_total=_first(summary, "params_total", "params.total", "total_params"),
        tokens_per_s=tps, curves=curves, config=config or {}, summary=summary or {}, metrics=metrics,
    )


@dataclass
class Comparison:
    rows: list[RunRow]

    def differing(self) -> list[str]:
        return H.differing_keys([r.config for r in self.rows])

    def labels(self) -> list[str]:
        keys = self.differing()
        return [H.run_label(r.name, r.config, keys) for r in self.rows]

    def warnings(self) -> list[str]:
        return H.budget_warnings([r.name for r in self.rows], [r.config for r in self.rows],
                                 [r.summary for r in self.rows], [r.metrics for r in self.rows])

    @property
    def domains(self) -> list[str]:
        return sorted({d for r in self.rows for d in r.per_domain})

    def header(self) -> list[str]:
        h = ["run", "val loss", "val ppl"]
        for d in self.domains:
            h += [f"{d} loss", f"{d} ppl"]
        return h + ["load CV", "max/mean load", "active params", "total params", "tokens/s"]

    def table(self) -> list[list[Any]]:
        out = []
        for r, label in zip(self.rows, self.labels()):
            row: list[Any] = [label, r.val_loss, r.val_ppl]
            for d in self.domains:
                v = r.per_domain.get(d, {})
                row += [v.get("loss"), v.get("ppl")]
            out.append(row + [r.load_cv, r.load_max_over_mean, r.params_active, r.params_total, r.tokens_per_s])
        return out

    def to_markdown(self) -> str:
        def f(v: Any) -> str:
            if v is None:
                return "–"
            if isinstance(v, float):
                return "–" if not math.isfinite(v) else f"{v:.4g}"
            return str(v)

        h = self.header()
        lines = ["| " + " | ".join(h) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(h))) + "|"]
        lines += ["| " + " | ".join(f(v) for v in row) + " |" for row in self.table()]
        return "\n".join([f"> warning: {w}" for w in self.warnings()] + ([""] if self.warnings() else []) + lines)

    CAPTIONS = {
        "train loss": "Train loss smoothed (EMA), raw values faint; lower is better. Runs that separate only late "
                      "differ in how they use the budget rather than in how they start.",
        "val loss": "Lower is better. Runs with the same data settings are evaluated on the same validation tokens "
                    "(a warning at the top says when they are not).",
        "mean load CV": "0 means every expert gets the same share of tokens; a curve that keeps rising is a run "
                        "collapsing onto fewer experts.",
    }

    def figures(self) -> list[tuple[str, bytes, str]]:
        figs = []
        for key, ylabel in (("train loss", "train loss (nats/token)"), ("val loss", "validation loss (nats/token)"),
                            ("mean load CV", "load CV, mean over MoE layers")):
            runs = [(lab, *r.curves[key]) for r, lab in zip(self.rows, self.labels())
                    if r.curves.get(key) and r.curves[key][0]]
            if runs:
                fname = key.replace(" ", "_") + ".png"
                smooth = H.smooth if key == "train loss" else None
                cap = self.CAPTIONS[key]
                figs.append((fname, P.png_bytes(P.overlay_curves(runs, "training step", ylabel, key, smooth=smooth)), cap))
        return figs

    def to_html(self, figures: list[tuple[str, bytes, str]] | None = None) -> str:
        figures = self.figures() if figures is None else figures
        imgs = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(b).decode()}' alt='{html.escape(c)}'>"
                       f"<figcaption>{html.escape(c)}</figcaption></figure>" for _, b, c in figures)
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>moelab compare</title>"
                f"<style>{CSS}</style></head><body><h1>moelab: run comparison</h1>"
                + "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in self.warnings())
                + (f"<p>Runs differ in: {html.escape(', '.join(H.short_key(k) for k in self.differing()))}.</p>"
                   if self.differing() else "<p>The runs' configs are identical.</p>")
                + 
                f"<section id='table'>{table_html(self.header(), self.table())}</section>"
                f"<section id='curves'>{imgs}</section></body></html>")


def compare_runs(run_dirs: list[str | Path]) -> Comparison:
    if not run_dirs:
        raise MoelabError("run_dirs is empty; give at least one run directory")
    names = [Path(p).name for p in run_dirs]
    if len(set(names)) != len(names):  # disambiguate same-named runs by their parent folder
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in run_dirs]
    return Comparison([summarize_run(p, n) for p, n in zip(run_dirs, names)])


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, str]:
    """Write ``compare.html``, ``compare.md`` and the PNGs to ``out_dir``; returns (html path, markdown)."""
    comp = compare_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = comp.figures()
    for name, png, _ in figs:
        (out / name).write_bytes(png)
    md = comp.to_markdown()
    (out / "compare.md").write_text(md + "\n")
    page = out / "compare.html"
    page.write_text(comp.to_html(figs))
    return page, md

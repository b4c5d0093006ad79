"""The sweep leaderboard: every configuration's metrics as mean ± 95% interval across seeds, and
pairwise evidence (difference with interval, TOST equivalence at a stated margin).

Per run (from its run directory):

* ``val_loss``/``val_ppl`` overall and per domain: the final evaluation (``summary.json``); all runs
  of a fair sweep are evaluated on the same tokens;
* load balance ``load_cv`` (std/mean of the per-expert counts) and ``load_max_over_mean``, the
  ``dropped_frac`` and the realised ``experts_per_token``: means over MoE layers and the last
  ``tail_steps`` logged training steps (``metrics.jsonl``);
* ``tokens_per_s``: the median of the per-step training throughput (robust to the first, slower
  steps and to a resume);
* ``params_total``/``params_active`` (per token) from ``summary.json``.

Per configuration (group): :func:`moelab.sweep.stats.summarize` over its seeds (Student-t 95%
interval; one seed gives no interval). Pairwise: :func:`moelab.sweep.stats.compare` (Welch
difference, 90% interval for the TOST at α=0.05, equivalence margin ``margin`` in the units of
``metric``); each configuration is compared with the best one, with ``baseline``, or all pairs.
Unfair sweeps (see :mod:`moelab.sweep.fairness`) are refused unless ``allow_unfair``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError, check_choice
from moelab.sweep.fairness import FairnessReport, check_fairness
from moelab.sweep.runner import RUNS_DIR, SWEEP_FILE, run_state
from moelab.sweep.stats import Comparison, Summary, compare, summarize

METRICS = ("val_ppl", "val_loss", "load_cv", "load_max_over_mean", "dropped_frac", "experts_per_token",
           "tokens_per_s")
HIGHER_IS_BETTER = {"tokens_per_s"}
RUN_FIELDS = ("val_loss", "val_ppl", "val_loss_se", "load_cv", "load_max_over_mean", "dropped_frac", "experts_per_token",
              "tokens_per_s", "params_total", "params_active")


@dataclass
class RunResult:
    name: str
    group: str
    seed: int
    config: dict[str, Any]
    values: dict[str, float | None]  # RUN_FIELDS
    per_domain: dict[str, dict[str, float]]  # domain -> {"loss", "ppl"}
    train_curve: tuple[list[int], list[float]]
    val_curve: tuple[list[int], list[float]]
    windows: tuple[list[float], list[int]] | None = None  # the final evaluation's per-window (nll, tokens)


@dataclass
class GroupRow:
    group: str
    runs: list[RunResult]
    stats: dict[str, Summary | None]  # RUN_FIELDS and "<domain> loss"/"<domain> ppl"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class PairRow:
    a: str
    b: str
    comparison: Comparison | None  # None: fewer than 2 seeds
    verdict: str
    design: str = "unpaired"  # "paired" (per-seed differences) | "unpaired" (Welch)
    n: int = 0  # seeds (pairs, or the smaller group)
    unpaired: Comparison | None = None  # the Welch analysis of the same runs, for the width comparison
    signed_rank_p: float | None = None  # paired only: Wilcoxon check
    seeds_needed: int | None = None  # seeds after which the comparison is expected to decide
    eval_se: float | None = None  # val loss only: the evaluation windows' bootstrap SE of the mean paired difference

    def to_dict(self) -> dict[str, Any]:
        def c(x: Comparison | None) -> dict[str, Any] | None:
            return None if x is None else {"diff": x.diff, "ci_low": x.ci_low, "ci_high": x.ci_high,
                                           "p_difference": x.p_difference, "p_equivalence": x.p_equivalence}
        return {"a": self.a, "b": self.b, "design": self.design, "n": self.n, "verdict": self.verdict,
                "comparison": c(self.comparison), "unpaired": c(self.unpaired),
                "signed_rank_p": self.signed_rank_p, "seeds_needed": self.seeds_needed, "eval_se": self.eval_se}


@dataclass
class Leaderboard:
    name: str
    metric: str
    margin: float
    groups: list[GroupRow]  # best first
    pairs: list[PairRow]
    fairness: FairnessReport
    missing: list[str] = field(default_factory=list)  # runs of the spec without a finished result
    domains: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- tables
    def header(self) -> list[str]:
        h = ["configuration", "seeds", "val ppl", "val loss"]
        h += [f"{d} ppl" for d in self.domains]
        return h + ["load CV", "max/mean load", "dropped", "experts/token", "tokens/s", "active params",
                    "total params"]

    def rows(self) -> list[list[str]]:
        out = []
        for g in self.groups:
            s = g.stats
            row = [g.group, str(len(g.runs)), _pm(s["val_ppl"], 2), _pm(s["val_loss"], 3)]
            row += [_pm(s.get(f"{d} ppl"), 2) for d in self.domains]
            row += [_pm(s["load_cv"], 2), _pm(s["load_max_over_mean"], 2), _pm(s["dropped_frac"], 3),
                    _pm(s["experts_per_token"], 2), _pm(s["tokens_per_s"], 0, thousands=True),
                    _count(s["params_active"]), _count(s["params_total"])]
            out.append(row)
        return out

    def pair_header(self) -> list[str]:
        unit = "ppl" if self.metric == "val_ppl" else "loss"
        return ["A", "B", "design", f"mean diff A-B ({unit})", "90% interval", "unpaired ±", "p (difference)",
                f"p (TOST, ±{self.margin:g})", "sign-rank p", "seeds to decide", "eval SE of diff", "verdict"]

    def pair_rows(self) -> list[list[str]]:
        out = []
        for p in self.pairs:
            c = p.comparison
            if c is None:
                out.append([p.a, p.b, p.design, "–", "–", "–", "–", "–", "–", "–", "–", p.verdict])
                continue
            u = p.unpaired
            out.append([p.a, p.b, f"{p.design} (n={p.n})", f"{c.diff:+.3f}", f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                        "–" if u is None else f"±{(u.ci_high - u.ci_low) / 2:.3f}", _p(c.p_difference),
                        _p(c.p_equivalence), "–" if p.signed_rank_p is None else _p(p.signed_rank_p),
                        "–" if p.seeds_needed is None else str(p.seeds_needed),
                        "–" if p.eval_se is None else f"{p.eval_se:.4f}", p.verdict])
        return out

    def notes(self) -> list[str]:
        n = [self.fairness.describe()]
        if not self.fairness.fair:
            n.insert(0, "WARNING: this sweep is NOT a fair comparison (compared anyway: --allow-unfair).")
        if self.missing:
            n.append(f"{len(self.missing)} run(s) of the spec have no finished result yet: "
                     + ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else ""))
        n.append("mean ± half-width of the 95% Student-t interval across seeds (no interval with one seed). "
                 "Balance, dropped fraction and experts/token: training batches, mean over MoE layers and the "
                 "last logged steps; tokens/s: median training throughput.")
        n.append(f"pairs: 'paired' = per-seed differences of {self.metric} (the runs of a seed share data order and "
                 "initial weights: common random numbers), paired t-interval and paired TOST; 'unpaired' = Welch. "
                 f"90% interval; equivalent when it lies inside ±{self.margin:g} (TOST at α=0.05), 'better' when the "
                 "two-sided p < 0.05. 'unpaired ±' is the Welch half-width of the same runs; 'sign-rank p' a "
                 "Wilcoxon check (cannot go below 0.0625 with 5 or fewer seeds); 'seeds to decide' assumes the "
                 "observed difference and spread are true (80% power).")
        se = [g.stats["val_loss_se"].mean for g in self.groups if g.stats.get("val_loss_se")]
        if se:
            n.append(f"evaluation noise: bootstrap standard error of one run's val loss over its evaluation windows "
                     f"{min(se):.4f}–{max(se):.4f}; the same windows for every run, so a comparison carries only "
                     "the noise of the per-window differences: 'eval SE of diff' (the windows' bootstrap SE of the "
                     "mean paired difference, which the spread over seeds does not contain; val loss only: – for "
                     "another metric or where the runs predate per-window records).")
        return n

    def to_markdown(self) -> str:
        out = [f"# Sweep leaderboard: {self.name}", ""]
        out += [f"> {n}" if i == 0 and not self.fairness.fair else n for i, n in enumerate(self.notes())]
        out += ["", _md_table(self.header(), self.rows()), ""]
        if self.pairs:
            out += [f"## Pairwise ({self.metric}, margin ±{self.margin:g})", "",
                    _md_table(self.pair_header(), self.pair_rows(), left=2) if self.pairwise_possible()
                    else self.no_pairs_line(), ""]
        return "\n".join(out)

    # ---------------------------------------------------------------- figures and HTML
    def figures(self) -> list[tuple[str, bytes, str]]:
        from moelab.sweep import plots

        return plots.leaderboard_figures(self)

    def pairwise_possible(self) -> bool:
        """Whether any pair has a test (each needs at least 2 seeds per configuration)."""
        return any(p.comparison is not None for p in self.pairs)

    def no_pairs_line(self) -> str:
        counts = sorted({len(g.runs) for g in self.groups})
        have = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        return (f"Pairwise tests need ≥2 seeds per configuration; this sweep has {have} seed(s) per configuration "
                "(add seeds, e.g. --seeds 0,1,2).")

    def to_html(self, figures: list[tuple[str, bytes, str]] | None = None) -> str:
        from moelab.htmlpage import page

        figures = self.figures() if figures is None else figures
        warn = "" if self.fairness.fair else \
            "<p class='missing'><b>WARNING: this sweep is NOT a fair comparison (compared anyway).</b></p>"
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in self.notes() if not n.startswith("WARNING"))
        imgs = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(b).decode()}' "
                       f"alt='{html.escape(c)}' data-file='{html.escape(f)}'><figcaption>{html.escape(c)}</figcaption>"
                       "</figure>" for f, b, c in figures)
        pairs = ""
        if self.pairs:
            body = (_html_table(self.pair_header(), self.pair_rows(), left=2) if self.pairwise_possible()
                    else f"<p class='note'>{html.escape(self.no_pairs_line())}</p>")
            pairs = (f"<section id='pairs'><h2>Pairwise ({html.escape(self.metric)}, margin ±{self.margin:g})</h2>"
                     f"{body}</section>")
        return page(f"moelab sweep {self.name}",
                    f"<h1>moelab sweep: {html.escape(self.name)}</h1>{warn}"
                    f"<section id='leaderboard'><h2>Leaderboard</h2>{_html_table(self.header(), self.rows())}{notes}"
                    f"</section>{pairs}<section id='plots'><h2>Plots</h2>{imgs}</section>")


# --------------------------------------------------------------------------- reading runs


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def read_run(run_dir: Path, name: str, group: str, seed: int, *, tail_steps: int = 50) -> RunResult:
    from moelab.train.metrics import read_jsonl

    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    tail = metrics[-tail_steps:]
    layers = [layer for rec in tail for layer in rec.get("layers", [])]
    tps = [r["tokens_per_s"] for r in metrics[min(5, len(metrics) // 2):] if r.get("tokens_per_s")]
    values = {
        "val_loss": summary.get("val_loss"), "val_ppl": summary.get("val_ppl"),
        "val_loss_se": summary.get("val_loss_se"),
        "load_cv": _mean([x.get("load_cv") for x in layers]),
        "load_max_over_mean": _mean([x.get("load_max_over_mean") for x in layers]),
        "dropped_frac": _mean([x.get("dropped_frac") for x in layers]),
        "experts_per_token": _mean([x.get("experts_per_token") for x in layers]),
        "tokens_per_s": statistics.median(tps) if tps else summary.get("tokens_per_s"),
        "params_total": summary.get("params_total"), "params_active": summary.get("params_active"),
    }
    per_domain = {d: {"loss": v.get("loss"), "ppl": v.get("ppl")} for d, v in (summary.get("per_domain") or {}).items()}
    return RunResult(name, group, seed, config, values, per_domain,
                     ([r["step"] for r in metrics], [r["loss"] for r in metrics]),
                     ([e["step"] for e in evals if e.get("val_loss") is not None],
                      [e["val_loss"] for e in evals if e.get("val_loss") is not None]),
                     _final_windows(run_dir, summary))


def _final_windows(run_dir: Path, summary: dict) -> tuple[list[float], list[int]] | None:
    """The per-window record of the evaluation the summary reports (None if absent or of another step)."""
    from moelab.sweep.windows import WINDOWS_FILE

    p = run_dir / WINDOWS_FILE
    if not p.is_file():
        return None
    w = json.loads(p.read_text())
    step = w.get("step")
    return (w["nll"], w["tokens"]) if step is not None and step == summary.get("eval_step") else None


def collect_results(sweep_dir: str | Path) -> tuple[dict[str, Any], list[RunResult], list[str]]:
    """(sweep.json, finished runs, names of the spec's runs that have not finished)."""
    sweep_dir = Path(sweep_dir)
    p = sweep_dir / SWEEP_FILE
    if not p.is_file():
        raise MoelabError(f"sweep_dir={str(sweep_dir)!r} is not a sweep directory (no {SWEEP_FILE}); "
                          "run `moelab sweep SPEC --out DIR` first")
    doc = json.loads(p.read_text())
    done, missing = [], []
    for r in doc["runs"]:
        run_dir = sweep_dir / RUNS_DIR / r["name"]
        if run_state(run_dir)[0] == "done":
            done.append(read_run(run_dir, r["name"], r["group"], int(r["seed"])))
        else:
            missing.append(r["name"])
    return doc, done, missing


# --------------------------------------------------------------------------- building


def build_leaderboard(sweep_dir: str | Path, *, metric: str = "val_ppl", margin: float = 1.0,
                      baseline: str | None = None, all_pairs: bool = False,
                      allow_unfair: bool | None = None, paired: bool = True) -> Leaderboard:
    """The leaderboard of the finished runs of a sweep directory (see the module docstring).
    ``paired``: compare configurations by per-seed differences over their common seeds (the default;
    sweeps use common random numbers); False: Welch's unpaired analysis."""
    check_choice("metric", metric, METRICS)
    if not (isinstance(margin, (int, float)) and margin > 0):
        raise MoelabError(f"margin={margin!r} is not valid; expected a number > 0 (in units of {metric})")
    doc, results, missing = collect_results(sweep_dir)
    if not results:
        raise MoelabError(f"sweep {str(sweep_dir)!r} has no finished runs yet ({len(missing)} to go)")
    fair_cfg = doc.get("spec", {}).get("fairness", {})
    tolerance = float(fair_cfg.get("active_param_tolerance", 0.05))
    if allow_unfair is None:
        allow_unfair = bool(fair_cfg.get("allow_unfair", False))
    report = check_fairness([(r.name, r.group, r.config, r.values["params_active"] or 0) for r in results],
                            tolerance=tolerance)
    if not report.fair and not allow_unfair:
        raise MoelabError(report.refusal())

    domains = sorted({d for r in results for d in r.per_domain})
    groups = _group_rows(results, domains, metric)
    names = [g.group for g in groups]
    if baseline is not None:
        check_choice("baseline", baseline, names)
    pairs = _pairs(names, baseline, all_pairs)
    by_name = {g.group: g for g in groups}
    pair_rows = [_pair_row(by_name[a], by_name[b], metric, margin, paired) for a, b in pairs]
    return Leaderboard(doc.get("spec", {}).get("name", Path(sweep_dir).name), metric, float(margin), groups,
                       pair_rows, report, missing, domains)


def _group_rows(results: list[RunResult], domains: list[str], metric: str) -> list[GroupRow]:
    """One row per configuration (summaries over its seeds), best ``metric`` first."""
    by_group: dict[str, list[RunResult]] = {}
    for r in results:
        by_group.setdefault(r.group, []).append(r)
    groups = []
    for g, runs in by_group.items():
        stats: dict[str, Summary | None] = {key: _summary([r.values[key] for r in runs]) for key in RUN_FIELDS}
        for d in domains:
            for k in ("loss", "ppl"):
                stats[f"{d} {k}"] = _summary([r.per_domain.get(d, {}).get(k) for r in runs])
        groups.append(GroupRow(g, sorted(runs, key=lambda r: r.seed), stats))
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    return sorted(groups, key=lambda g: (sign * g.stats[metric].mean if g.stats[metric] else math.inf))


def _summary(values: list[float | None]) -> Summary | None:
    vals = [v for v in values if v is not None]
    return summarize(vals) if vals else None


def _pairs(names: list[str], baseline: str | None, all_pairs: bool) -> list[tuple[str, str]]:
    if len(names) < 2:
        return []
    if all_pairs:
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    ref = baseline or names[0]
    return [(n, ref) for n in names if n != ref]


def _pair_row(ga: GroupRow, gb: GroupRow, metric: str, margin: float, paired: bool) -> PairRow:
    from moelab.sweep.stats import paired_compare, seeds_needed, signed_rank_p

    va = {r.seed: r.values[metric] for r in ga.runs if r.values[metric] is not None}
    vb = {r.seed: r.values[metric] for r in gb.runs if r.values[metric] is not None}
    common = sorted(set(va) & set(vb))
    unpaired = compare(list(va.values()), list(vb.values()), margin=margin) if min(len(va), len(vb)) >= 2 else None
    if paired and len(common) >= 2:
        a, b = [va[s] for s in common], [vb[s] for s in common]
        c = paired_compare(a, b, margin=margin)
        sd = statistics.stdev([x - y for x, y in zip(a, b)])
        need = seeds_needed(c.diff, sd, margin=margin)
        return PairRow(ga.group, gb.group, c, c.verdict(metric not in HIGHER_IS_BETTER, (ga.group, gb.group)), "paired", len(common),
                       unpaired, signed_rank_p(a, b), need, _pair_eval_se(ga, gb, common) if metric == "val_loss" else None)
    if unpaired is None:
        return PairRow(ga.group, gb.group, None, "needs >= 2 seeds per configuration", "paired" if paired else "unpaired")
    sd = math.sqrt(statistics.variance(va.values()) + statistics.variance(vb.values()))
    return PairRow(ga.group, gb.group, unpaired, unpaired.verdict(metric not in HIGHER_IS_BETTER, (ga.group, gb.group)), "unpaired",
                   min(len(va), len(vb)), unpaired, None, seeds_needed(unpaired.diff, sd, margin=margin))


def _pair_eval_se(ga: GroupRow, gb: GroupRow, seeds: list[int]) -> float | None:
    from moelab.train.evalnoise import paired_bootstrap_se

    wa = {r.seed: r.windows for r in ga.runs}
    wb = {r.seed: r.windows for r in gb.runs}
    if any(wa.get(s) is None or wb.get(s) is None for s in seeds):
        return None
    se = paired_bootstrap_se([wa[s] for s in seeds], [wb[s] for s in seeds])
    return None if math.isnan(se) else se


def write_leaderboard(sweep_dir: str | Path, out_dir: str | Path | None = None, **kwargs: Any) -> tuple[Leaderboard, Path, Path]:
    """Write ``leaderboard.md``, ``leaderboard.html`` (figures embedded) and the PNGs; returns (lb, md, html)."""
    lb = build_leaderboard(sweep_dir, **kwargs)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = lb.figures()
    for fname, png, _ in figs:
        (out / fname).write_bytes(png)
    md = out / "leaderboard.md"
    md.write_text(lb.to_markdown() + "".join(f"\n![{c}]({f})\n" for f, _, c in figs))
    page = out / "leaderboard.html"
    page.write_text(lb.to_html(figs))
    return lb, md, page


# --------------------------------------------------------------------------- formatting


def _pm(s: Summary | None, nd: int, *, thousands: bool = False) -> str:
    if s is None or s.mean is None or not math.isfinite(s.mean):
        return "–"
    fmt = (lambda x: f"{x:,.{nd}f}") if thousands else (lambda x: f"{x:.{nd}f}")
    if s.n < 2 or not math.isfinite(s.half_width):
        return fmt(s.mean)
    return f"{fmt(s.mean)} ± {fmt(s.half_width)}"


def _count(s: Summary | None) -> str:
    if s is None:
        return "–"
    return f"{s.mean / 1e6:.3f}M" if s.mean >= 1e5 else f"{s.mean:,.0f}"


def _p(p: float) -> str:
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def _md_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table whose first ``left`` columns are left-aligned (names), the rest right-aligned."""
    from moelab.htmlpage import table

    return table(header, rows, left=left)

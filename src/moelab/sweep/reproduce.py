"""Seed-paper claims as runnable, decided experiments (``moelab reproduce``).

A :class:`Claim` names its paper, the configurations (sweep variants over the ``tiny`` preset at the
sweeps' reduced budget), the seeds, and one or more :class:`Condition` s, each a paired comparison
of two configurations on one metric with a direction and a margin:

* ``better``: A beats B. *Reproduced* when the paired difference is significant in A's favour
  (two-sided paired t-test, α = 0.05); *contradicted* when it is significant against A, or when A
  and B are equivalent within the margin (no gain worth the name); otherwise *inconclusive*.
* ``no_worse`` (non-inferiority, "at least as good", "at equal loss"): *reproduced* when the 90%
  interval of A's improvement lies above ``-margin`` (one-sided test at α = 0.05); *contradicted* when
  it lies entirely below ``-margin``; otherwise *inconclusive*.
* ``equivalent``: *reproduced* by the paired TOST at ``margin``; *contradicted* when the interval lies
  entirely outside ``(-margin, margin)``; otherwise *inconclusive*.

A claim is reproduced when every condition is, contradicted when any condition is, and otherwise
inconclusive, with the number of seeds the power analysis (:func:`moelab.sweep.stats.seeds_needed`)
expects to decide it. Claims about balance or compute are decided on that metric (``load_max_over_mean``,
``experts_per_token``), with a quality condition beside it where the paper claims "at equal loss".
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError, check_choice
from moelab.sweep.leaderboard import HIGHER_IS_BETTER, METRICS

RELATIONS = ("better", "no_worse", "equivalent")
VERDICTS = ("reproduced", "contradicted", "inconclusive")
CLAIMS: dict[str, "Claim"] = {}


@dataclass(frozen=True)
class Condition:
    a: str
    b: str
    metric: str
    relation: str
    margin: float

    def describe(self) -> str:
        words = {"better": "beats", "no_worse": "is no worse than", "equivalent": "is equivalent to"}
        return f"{self.a} {words[self.relation]} {self.b} on {self.metric} (margin {self.margin:g})"


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str
    statement: str
    variants: list[dict[str, Any]]
    conditions: list[Condition]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    base: dict[str, Any] = field(default_factory=dict)
    fairness: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def spec(self, *, scale: str = "tiny", seeds: list[int] | None = None, extra: dict[str, Any] | None = None):
        """The :class:`SweepSpec` that runs this claim (``scale``: "tiny" at the sweeps' budget, or "small")."""
        from moelab.sweep.presets import BUDGET
        from moelab.sweep.spec import SweepSpec

        check_choice("scale", scale, ("tiny", "small"))
        base = {**(BUDGET if scale == "tiny" else {}), **self.base, **(extra or {})}
        return SweepSpec.from_dict({"name": f"reproduce-{self.name}", "preset": scale, "seeds": seeds or self.seeds,
                                    "base": base, "variants": self.variants, "fairness": dict(self.fairness),
                                    "description": self.statement})


def register(claim: Claim) -> Claim:
    names = {v["name"] for v in claim.variants}
    for c in claim.conditions:
        check_choice("condition.relation", c.relation, RELATIONS)
        check_choice("condition.metric", c.metric, METRICS)
        for side in (c.a, c.b):
            check_choice(f"claim {claim.name!r} condition configuration", side, sorted(names))
    CLAIMS[claim.name] = claim
    return claim


def get_claim(name: str) -> Claim:
    import moelab.sweep.claims  # noqa: F401  (fills the registry)

    check_choice("claim", name, sorted(CLAIMS))
    return CLAIMS[name]


def all_claims() -> list[Claim]:
    import moelab.sweep.claims  # noqa: F401

    return [CLAIMS[n] for n in sorted(CLAIMS)]


# --------------------------------------------------------------------------- verdicts


@dataclass
class ConditionResult:
    condition: Condition
    verdict: str
    improvement: tuple[float, float, float] | None  # A's improvement over B: (mean, lo, hi), 90% interval
    p_difference: float | None
    seeds: int
    seeds_needed: int | None


def decide(condition: Condition, comparison, seeds: int, seeds_needed: int | None) -> ConditionResult:
    """The verdict of one condition from the paired comparison of A - B (see the module docstring)."""
    if comparison is None:
        return ConditionResult(condition, "inconclusive", None, None, seeds, seeds_needed)
    sign = 1.0 if condition.metric in HIGHER_IS_BETTER else -1.0  # improvement = sign * (A - B)
    lo, hi = sorted((sign * comparison.ci_low, sign * comparison.ci_high))
    mean, m = sign * comparison.diff, condition.margin
    significant = comparison.p_difference < comparison.alpha
    if condition.relation == "better":
        verdict = ("reproduced" if significant and mean > 0 else
                   "contradicted" if (significant and mean < 0) or (-m < lo and hi < m) else "inconclusive")
    elif condition.relation == "no_worse":
        verdict = "reproduced" if lo > -m else "contradicted" if hi < -m else "inconclusive"
    else:
        verdict = "reproduced" if -m < lo and hi < m else "contradicted" if lo >= m or hi <= -m else "inconclusive"
    return ConditionResult(condition, verdict, (mean, lo, hi), comparison.p_difference, seeds, seeds_needed)


def combine(results: list[ConditionResult]) -> tuple[str, int | None]:
    """(claim verdict, seeds expected to decide it when inconclusive)."""
    verdicts = {r.verdict for r in results}
    if verdicts == {"reproduced"}:
        return "reproduced", None
    if "contradicted" in verdicts:
        return "contradicted", None
    needed = [r.seeds_needed for r in results if r.verdict == "inconclusive" and r.seeds_needed is not None]
    return "inconclusive", max(needed) if needed else None


def evaluate_claim(claim: Claim, sweep_dir: str | Path) -> tuple[str, int | None, list[ConditionResult]]:
    """Decide ``claim`` from the finished runs in ``sweep_dir`` (paired comparisons)."""
    from moelab.sweep.leaderboard import build_leaderboard

    results = []
    for c in claim.conditions:
        lb = build_leaderboard(sweep_dir, metric=c.metric, margin=c.margin, baseline=c.b, paired=True,
                               allow_unfair=bool(claim.fairness.get("allow_unfair", False)) or None)
        row = next((p for p in lb.pairs if p.a == c.a and p.b == c.b), None)
        if row is None:
            raise MoelabError(f"claim {claim.name!r}: no finished runs of {c.a!r} and {c.b!r} in {str(sweep_dir)!r}")
        results.append(decide(c, row.comparison, row.n, row.seeds_needed))
    verdict, needed = combine(results)
    return verdict, needed, results


# --------------------------------------------------------------------------- running and the docs page


def run_claim(claim: Claim, out_dir: str | Path, *, jobs: int = 1, scale: str = "tiny", seeds: list[int] | None = None,
              extra: dict[str, Any] | None = None, progress: str = "auto", until_conclusive: bool = False,
              max_seeds: int = 10):
    """Train the claim's sweep into ``out_dir`` (resumable), then decide it. Returns
    ``(verdict, seeds_needed, condition results, leaderboard markdown, wall seconds)``."""
    import time

    from moelab.sweep.adaptive import run_until_conclusive
    from moelab.sweep.leaderboard import write_leaderboard
    from moelab.sweep.runner import run_sweep

    t0 = time.perf_counter()
    spec = claim.spec(scale=scale, seeds=seeds, extra=extra)
    run_kwargs = dict(jobs=jobs, progress=progress)
    if until_conclusive:
        metric = claim.conditions[0]
        result, _ = run_until_conclusive(spec, out_dir, max_seeds=max_seeds, run_kwargs=run_kwargs,
                                         report_kwargs=dict(metric=metric.metric, margin=metric.margin, all_pairs=True))
    else:
        result = run_sweep(spec, out_dir, **run_kwargs)
    if not result.ok:
        raise MoelabError(f"claim {claim.name!r}: {len(result.failed)} run(s) failed or the sweep was interrupted; "
                          f"see {out_dir}/logs (run the same command again to continue)")
    from moelab.sweep.windows import backfill

    backfill(out_dir)  # runs from before per-window records: re-evaluated once, checked against their val loss
    verdict, needed, rows = evaluate_claim(claim, out_dir)
    lb, _, _ = write_leaderboard(out_dir, metric="val_loss", margin=0.01, baseline=claim.conditions[0].b,
                                 allow_unfair=bool(claim.fairness.get("allow_unfair", False)) or None)
    return verdict, needed, rows, lb, add_wall_time(out_dir, time.perf_counter() - t0)


def add_wall_time(out_dir: str | Path, seconds: float) -> float:
    """The claim's wall time over every command that built it (``reproduce-wall.json`` in its sweep
    folder): a re-run that reuses finished runs adds only its own few seconds."""
    import json

    path = Path(out_dir) / "reproduce-wall.json"
    total = (json.loads(path.read_text()).get("wall_s", 0.0) if path.is_file() else 0.0) + seconds
    path.write_text(json.dumps({"wall_s": total}))
    return total


def verdict_text(verdict: str, needed: int | None) -> str:
    if verdict != "inconclusive":
        return f"**{verdict}**"
    return "**inconclusive**" + (f" ({needed} seeds expected to decide)" if needed else " (no seed count decides it)")


def claim_section(claim: Claim, verdict: str, needed: int | None, rows: list[ConditionResult], lb, *,
                  wall_s: float, jobs: int, scale: str, figures_dir: Path | None = None, rel: str = "") -> str:
    """The markdown section of ``docs/reproductions.md`` for one decided claim."""
    out = [f"## {claim.name}: {verdict_text(verdict, needed)}", "", f"*{claim.paper}.* {claim.statement}", ""]
    out += ["| condition | seeds | A's improvement (90% interval) | p | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        imp = "–" if r.improvement is None else f"{r.improvement[0]:+.4f} [{r.improvement[1]:+.4f}, {r.improvement[2]:+.4f}]"
        p = "–" if r.p_difference is None else f"{r.p_difference:.3g}"
        out.append(f"| {r.condition.describe()} | {r.seeds} | {imp} | {p} | {r.verdict} |")
    out += ["", f"Scale `{scale}`, seeds {sorted({x.seed for g in lb.groups for x in g.runs})}, "
            f"{wall_s / 60:.1f} min of wall time (training and deciding) with `--jobs {jobs}`. {claim.notes}".rstrip(), ""]
    out += ["<details><summary>leaderboard (val loss, paired)</summary>", "", demote_headings(lb.to_markdown()), "",
            "</details>", ""]
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for fname, png, caption in lb.figures()[:1]:
            target = figures_dir / f"{claim.name}-{fname}"
            target.write_bytes(png)
            out += [f"![{caption}]({rel}{target.name})", ""]
    return wrap_section(claim.name, "\n".join(out))


_OPEN, _CLOSE = "<!-- claim: {0} --><a id=\"{0}\"></a>", "<!-- /claim: {0} -->"
_HEAD = ("# Reproductions of the seed papers' claims\n\n"
         "Generated by `moelab reproduce` (do not edit by hand): each section is one claim decided by paired "
         "comparisons over common random numbers; see `moelab/sweep/reproduce.py` for the verdict rules.\n")


def demote_headings(md: str, levels: int = 2) -> str:
    """Push every markdown heading of ``md`` down ``levels`` levels, so that an embedded leaderboard's
    headings ("# Sweep leaderboard", "## Pairwise") never read as sections of the page around it."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in md.split("\n"))


def wrap_section(name: str, body: str) -> str:
    """A claim's section between the markers :func:`read_sections` splits the page on."""
    return f"{_OPEN.format(name)}\n{body.strip()}\n{_CLOSE.format(name)}\n"


def read_sections(text: str) -> dict[str, str]:
    """``{claim name: wrapped section}`` of a generated page (sections are found by their markers only)."""
    found = re.findall(r"<!-- claim: (\S+) --><a id=\"\1\"></a>\n(.*?)\n<!-- /claim: \1 -->", text, flags=re.S)
    return {name: wrap_section(name, body) for name, body in found}


def summary_table(sections: dict[str, str]) -> str:
    """One row per claim: its verdict, as its section's heading states it."""
    rows = ["| claim | verdict |", "|---|---|"]
    for name, sec in sections.items():
        m = re.search(rf"^## {re.escape(name)}: (.*)$", sec, flags=re.M)
        rows.append(f"| [{name}](#{name}) | {m.group(1) if m else '?'} |")
    return "\n".join(rows)


def update_docs(path: str | Path, name: str, section: str) -> Path:
    """Replace (or add) claim ``name``'s section in the generated page ``path`` (atomically); the page
    opens with a verdict table over all its sections."""
    path = Path(path)
    sections = read_sections(path.read_text()) if path.is_file() else {}
    sections[name] = section if section.startswith(_OPEN.format(name)) else wrap_section(name, section)
    ordered = {k: sections[k] for k in sorted(sections)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(_HEAD + "\n" + summary_table(ordered) + "\n\n" + "\n".join(ordered.values()))
    shutil.move(str(tmp), str(path))
    return path

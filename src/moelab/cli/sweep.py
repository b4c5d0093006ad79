"""``moelab sweep SPEC`` (run a sweep, then write its leaderboard) and ``moelab sweep-report DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moelab.errors import MoelabError


def _add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", choices=["val_ppl", "val_loss", "load_cv", "load_max_over_mean", "dropped_frac",
                                        "experts_per_token", "tokens_per_s"], default="val_ppl",
                   help="metric of the pairwise comparisons; a claim about balance or compute is decided on "
                        "its own metric (default: val_ppl)")
    p.add_argument("--unpaired", action="store_true",
                   help="Welch's unpaired analysis instead of per-seed paired differences (default: paired)")
    p.add_argument("--margin", type=float, default=1.0,
                   help="equivalence margin for TOST, in units of --metric (default: 1.0, i.e. 1 ppl)")
    p.add_argument("--baseline", metavar="CONFIG", help="compare every configuration with this one "
                   "(default: with the best one)")
    p.add_argument("--all-pairs", action="store_true", help="compare every pair of configurations")
    p.add_argument("--allow-unfair", action="store_true", default=None,
                   help="compare runs even when token budgets, data or active parameters differ")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run a sweep (base config x axes x seeds) and write its leaderboard",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every configuration of a sweep spec (a .toml/.yaml file or a named preset) for every "
                    "seed, each in SWEEP_DIR/runs/<run>, then write SWEEP_DIR/leaderboard.{md,html}. Every run's "
                    "config and the fairness of the comparison (token budget, active parameters, data) are "
                    "checked before anything trains. Finished runs are skipped and interrupted ones resumed, so "
                    "the same command continues a sweep that was stopped.",
        epilog="presets: " + ", ".join(_preset_names()) + "  (moelab sweep --list)")
    p.add_argument("spec", nargs="?", metavar="SPEC", help="a sweep spec file (.toml/.yaml) or a preset name")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/sweeps/<spec name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default: 1)")
    p.add_argument("--seeds", metavar="LIST", help="comma-separated seeds replacing the spec's (e.g. 0,1,2)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="add/replace a base override of every run (e.g. --set train.steps=50); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate and show the runs, parameters and fairness; "
                   "train nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop starting runs after the first failure")
    p.add_argument("--no-report", action="store_true", help="do not write the leaderboard at the end")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="sweep progress: one updating line on a terminal, log lines otherwise (default: auto)")
    p.add_argument("--list", action="store_true", help="list the sweep presets and exit")
    p.add_argument("--until-conclusive", action="store_true",
                   help="after the sweep, add seeds while a pairwise comparison is inconclusive (see --max-seeds)")
    p.add_argument("--max-seeds", type=int, default=10, help="seed budget of --until-conclusive (default: 10)")
    _add_report_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-report", help="write the leaderboard of a sweep directory (finished runs so far)",
                       description="Leaderboard (markdown + HTML with plots) of the finished runs of a sweep "
                                   "directory: mean ± 95% interval across seeds, pairwise differences and TOST "
                                   "equivalence.")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("--out", metavar="DIR", help="where to write (default: SWEEP_DIR)")
    _add_report_args(p)
    p.set_defaults(func=cmd_report)


def _preset_names() -> list[str]:
    from moelab.sweep.presets import SWEEP_PRESETS

    return list(SWEEP_PRESETS)


def load_spec(text: str, seeds: list[int] | None = None):
    """A spec file path or a preset name -> SweepSpec."""
    from moelab.sweep.presets import SWEEP_PRESETS, sweep_preset
    from moelab.sweep.spec import SweepSpec

    path = Path(text)
    if path.suffix.lower() in (".toml", ".yaml", ".yml") or path.exists():
        spec = SweepSpec.load(path)
        if seeds is not None:
            spec.seeds = seeds
            spec.check()
        return spec
    if text in SWEEP_PRESETS:
        return sweep_preset(text, seeds)
    raise MoelabError(f"SPEC={text!r} is neither a spec file (.toml/.yaml) nor a sweep preset; presets: "
                      + ", ".join(map(repr, SWEEP_PRESETS)))


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MoelabError(f"--seeds={text!r} is not valid; expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise MoelabError("--seeds is empty; give at least one seed")
    return seeds


def cmd_sweep(args: argparse.Namespace) -> int:
    from moelab.sweep.runner import plan_sweep, run_sweep

    if args.list:
        from moelab.sweep.presets import SWEEP_PRESETS

        for name, fn in SWEEP_PRESETS.items():
            try:
                d = fn()
                n = len(d.get("variants") or [1]) * len(d["seeds"])
                print(f"{name:<14} {n:>3} runs  {d.get('description', '')}")
            except MoelabError as e:
                print(f"{name:<14}   -       {e}")
        return 0
    if not args.spec:
        raise MoelabError("SPEC is missing: give a sweep spec file or a preset name (moelab sweep --list)")
    spec = load_spec(args.spec, _parse_seeds(args.seeds))
    for item in args.set:
        if "=" not in item:
            raise MoelabError(f"--set {item!r} is not valid; expected KEY=VALUE, e.g. train.steps=50")
        key, value = item.split("=", 1)
        spec.base[key.strip()] = value
    spec.check()
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
    if args.dry_run:
        print(plan_sweep(spec, out, allow_unfair=args.allow_unfair).describe())
        return 0
    run_kwargs = dict(jobs=args.jobs, allow_unfair=args.allow_unfair, progress=args.progress, fail_fast=args.fail_fast)
    if args.until_conclusive:
        from moelab.sweep.adaptive import run_until_conclusive

        result, _ = run_until_conclusive(spec, out, max_seeds=args.max_seeds, run_kwargs=run_kwargs,
                                         report_kwargs=_report_kwargs(args))
    else:
        result = run_sweep(spec, out, **run_kwargs)
    print(f"sweep {spec.name!r}: {len(result.finished)} trained, {len(result.skipped)} already finished, "
          f"{len(result.failed)} failed{', interrupted' if result.interrupted else ''} "
          f"in {result.wall_s / 60:.1f} min -> {out}")
    if not args.no_report and (result.finished or result.skipped):
        _report(out, None, args)
    return 0 if result.ok else (130 if result.interrupted else 1)


def _report(sweep_dir: Path, out: str | None, args: argparse.Namespace) -> None:
    from moelab.sweep.leaderboard import write_leaderboard

    lb, md, page = write_leaderboard(sweep_dir, out, **_report_kwargs(args))
    print(lb.to_markdown())
    print(f"\nleaderboard: {md} and {page}", file=sys.stderr)


def _report_kwargs(args: argparse.Namespace) -> dict:
    return dict(metric=args.metric, margin=args.margin, baseline=args.baseline, all_pairs=args.all_pairs,
                allow_unfair=args.allow_unfair, paired=not args.unpaired)


def cmd_report(args: argparse.Namespace) -> int:
    _report(Path(args.sweep_dir), args.out, args)
    return 0

"""``moelab reproduce``: run the seed papers' claims as decided experiments (moelab.sweep.reproduce)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab.errors import MoelabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run a seed paper's claim as a paired experiment and decide it",
        description="Each claim (moelab reproduce --list) is a sweep over the tiny preset at the sweeps' budget with "
                    "paired seeds (common random numbers) and one or more conditions; the verdict is reproduced, "
                    "contradicted or inconclusive (with the seeds expected to decide). Finished runs are reused, "
                    "so the same command continues an interrupted claim. The verdict, its tables and a plot go "
                    "into --docs (default docs/reproductions.md).")
    p.add_argument("claims", nargs="*", metavar="CLAIM", help="claim names (see --list)")
    p.add_argument("--list", action="store_true", help="list the claims with their papers and exit")
    p.add_argument("--all", action="store_true", help="run every claim")
    p.add_argument("--scale", choices=["tiny", "small"], default="tiny",
                   help="tiny: the sweeps' 300-step budget on the tiny preset (default); small: the small preset")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (default: 2)")
    p.add_argument("--seeds", metavar="LIST", help="comma-separated seeds replacing the claim's (default 0,1,2)")
    p.add_argument("--out", metavar="DIR", default="runs/reproduce", help="where the sweeps go (default: runs/reproduce)")
    p.add_argument("--docs", metavar="FILE", default="docs/reproductions.md",
                   help="the generated page to update (default: docs/reproductions.md)")
    p.add_argument("--until-conclusive", action="store_true", help="add seeds while the claim is inconclusive")
    p.add_argument("--max-seeds", type=int, default=10, help="seed budget of --until-conclusive (default: 10)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override for every run, e.g. --set data.source=/my/corpus; repeatable")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto", help="sweep progress display")
    p.set_defaults(func=cmd_reproduce)


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise MoelabError(f"--set {item!r} is not valid; expected KEY=VALUE, e.g. data.source=/my/corpus")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def cmd_reproduce(args: argparse.Namespace) -> int:
    from moelab.cli.sweep import _parse_seeds
    from moelab.sweep.reproduce import all_claims, claim_section, get_claim, run_claim, update_docs, verdict_text

    if args.list:
        for c in all_claims():
            print(f"{c.name:<18} {len(c.variants)} configs x {len(c.seeds)} seeds  {c.paper}")
        return 0
    claims = all_claims() if args.all else [get_claim(n) for n in args.claims]
    if not claims:
        raise MoelabError("name a claim (moelab reproduce --list), or give --all")
    docs = Path(args.docs)
    summary = []
    for claim in claims:
        verdict, needed, rows, lb, wall = run_claim(
            claim, Path(args.out) / claim.name, jobs=args.jobs, scale=args.scale, seeds=_parse_seeds(args.seeds),
            extra=_overrides(args.set), progress=args.progress, until_conclusive=args.until_conclusive,
            max_seeds=args.max_seeds)
        section = claim_section(claim, verdict, needed, rows, lb, wall_s=wall, jobs=args.jobs, scale=args.scale,
                                figures_dir=docs.parent / "reproductions", rel="reproductions/")
        update_docs(docs, claim.name, section)
        summary.append(f"{claim.name:<18} {verdict_text(verdict, needed).replace('**', '')}")
        print(section)
    print("\n".join(["", "verdicts:"] + summary + [f"-> {docs}"]))
    return 0

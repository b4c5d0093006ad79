"""``moelab routers``: list every registered router with its one-line description and paper."""

from __future__ import annotations

import argparse
import json
import textwrap


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("routers", help="list the registered routers (name, description, paper)",
                       description="List every router registered in moelab.layers.routers.ROUTERS.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--kwargs", action="store_true", help="also show each router's router_kwargs")
    p.set_defaults(func=run)


def router_rows() -> list[dict[str, object]]:
    """One dict per registered router: name, description, paper, kwargs (its router_kwargs)."""
    from moelab.layers.routers import ROUTERS, router_kwarg_names

    return [
        {"name": e.name, "description": e.description, "paper": e.paper, "kwargs": router_kwarg_names(e.obj)}
        for e in ROUTERS.entries()
    ]


def run(args: argparse.Namespace) -> int:
    rows = router_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(str(r["name"])) for r in rows), default=4)
    for r in rows:
        print(f"{str(r['name']):<{width}}  {r['description']}")
        pad = " " * (width + 2)
        if r["paper"]:
            print(textwrap.fill(f"paper: {r['paper']}", width=110, initial_indent=pad, subsequent_indent=pad + "  "))
        if args.kwargs and r["kwargs"]:
            print(f"{pad}router_kwargs: {', '.join(map(str, r['kwargs']))}")
    print(f"\n{len(rows)} routers")
    return 0

"""Collect `moelab depth-route` results into benchmarks/results/depth_route.{md,json}.

Usage: python benchmarks/depth_route_table.py EVIDENCE_DIR [BASE_RUN]
EVIDENCE_DIR holds one `moelab depth-route` output per method and budget (METHOD-BUDGET/depth_route.json).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results"


def rows(ev: Path) -> list[dict]:
    out = []
    for f in sorted(ev.glob("*/depth_route.json")):
        m = json.loads(f.read_text())
        out.append({"dir": f.parent.name, "method": m["method"], "budget": m["budget"], "unit": m["budget_unit"],
                    "base": m["results"][0], "routed": m["results"][1], "extra": m["results"][2:], "fit": m["fit"],
                    "spec": m["spec"]})
    return out


def _ppl(x: float) -> str:
    return f"{math.exp(x):.2f}"


def table(rs: list[dict]) -> str:
    domains = sorted(rs[0]["base"]["per_domain"])
    head = ["method", "budget", *(f"{d} ppl" for d in domains), "overall ppl", "Δ loss vs base",
            "attn / token", "FFN / token", "layers / token", "FLOPs vs base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    b = rs[0]["base"]
    lines.append("| unmodified | – | " + " | ".join(_ppl(b["per_domain"][d]["loss"]) for d in domains) +
                 f" | {_ppl(b['loss'])} | +0.0000 | 4.00 | 4.00 | 4.00 | 1.000 |")
    for r in rs:
        for x in [r["routed"], *r["extra"]]:
            name = r["method"] if x is r["routed"] else f"{r['method']}: {x['method']}"
            lines.append(f"| {name} | {r['budget']:g} | " + " | ".join(_ppl(x["per_domain"][d]["loss"]) for d in domains)
                         + f" | {_ppl(x['loss'])} | {x['loss'] - r['base']['loss']:+.4f} | {x['attn_layers_per_token']:.2f} | "
                           f"{x['ffn_layers_per_token']:.2f} | {x['layers_per_token']:.2f} | {x['flops_vs_base']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ev = Path(sys.argv[1])
    rs = rows(ev)
    (OUT / "depth_route.json").write_text(json.dumps(rs, indent=1))
    (OUT / "depth_route_table.md").write_text(table(rs) + "\n")
    print(table(rs))


if __name__ == "__main__":
    main()

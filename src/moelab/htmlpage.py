"""The style sheet and table markup shared by every HTML page moelab writes (run report, run
comparison, sweep leaderboard, route comparison), so they look alike. Plain strings; imports nothing
heavy, so `moelab.route` (independent of the training stack) can use it too.

Tables sit in a ``div.tablewrap`` that scrolls sideways inside its own box when a table is wider
than the page, so the page itself never overflows horizontally."""

from __future__ import annotations

import html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #0072B2}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#eef3f8}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
.tablewrap{max-width:100%;overflow-x:auto}
.paper{color:#555;font-style:italic}.missing{color:#D55E00}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
nav a{margin-right:1em}.lead{font-size:1.15em}.lead b{font-size:1.2em}.note{color:#555}
.warn{background:#fff4e5;border-left:4px solid #E69F00;padding:.4em .8em}details{margin:.6em 0}
summary{cursor:pointer;color:#0072B2}code.tok{background:#f0f0f0;padding:0 .2em}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}dl.defs dt{font-weight:bold;float:left;clear:left;
margin-right:.5em}dl.defs dd{margin:0 0 .2em 0}
"""


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table of already formatted (plain text) cells, escaped here; the first ``left``
    columns are left-aligned (names), the rest right-aligned (numbers); wrapped to scroll in its box."""
    h = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(c))}</th>' for i, c in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(v))}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return wrap(f"<table><tr>{h}</tr>{body}</table>")


def wrap(table_html: str) -> str:
    """Put a table in a box that scrolls sideways when the table is wider than the page."""
    return f"<div class='tablewrap'>{table_html}</div>"


def page(title: str, body: str) -> str:
    """A whole self-contained page (no script, no external resource) with the shared style sheet."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")

"""`moelab report RUN`: a self-contained HTML report of a run's routing (plus the PNGs).

The HTML embeds every figure as a base64 PNG and uses no script or external resource, so it
opens offline. It leads with ``summary`` (the ten-second answer: final val perplexity overall and
per domain, balance, tokens/s, parameters, and the config's differences from the nearest preset);
then the plots; the raw config is folded away at the end of ``config``. Plots of a series that is
constant for the run's settings are replaced by one line saying so. Sections (their ids are
stable, tests check them): ``summary``, ``config``, ``loss``,
``balance``, ``load``, ``specialisation``, ``coactivation``, ``stability``, ``geometry``,
``consistency``, ``variable_k``. Trace-based sections say why they are empty when the run could
not be traced.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import headline as H
from moelab.analysis import metrics as M
from moelab.analysis import plots as P
from moelab.analysis.analyses import RunAnalysis, analyze_run
from moelab.htmlpage import CSS, wrap  # the style sheet shared by every moelab page

TRAJ_HINTS = {  # what to look for in each balance trajectory (figure captions)
    "load_max_over_mean": "1 is perfect balance; a layer that stays high sends most tokens to a few experts.",
    "load_cv": "0 is perfect balance; look for the surge, then stabilisation, early in training.",
    "dropped_frac": "Slots over an expert's capacity; above 0, those tokens skip the experts in that layer.",
    "router_entropy": "Falling entropy means sharper routing decisions; a flat high line means the router is unsure.",
    "experts_per_token": "Varies only with dynamic-k routers; a drift shows where the router spends compute.",
    "unused_experts": "Experts that received no token in the step; a plateau above 0 means dead experts.",
    "bias_norm": "A bias that keeps growing means the balancing bias is fighting the router's preferences.",
}

SECTION_IDS = ["summary", "config", "loss", "balance", "load", "specialisation", "coactivation", "stability",
               "geometry", "consistency", "variable_k"]



@dataclass
class Section:
    id: str
    title: str
    paper: str = ""
    body: list[str] = field(default_factory=list)  # HTML fragments
    images: list[tuple[str, bytes, str]] = field(default_factory=list)  # (file name, png, caption)


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, (float, np.floating)):
        return "–" if not np.isfinite(x) else f"{float(x):.{nd}g}"
    return html.escape(str(x))


def table_html(header: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(c)}</th>' for i, c in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i == 0 else ""}">{_fmt(v)}</td>' for i, v in enumerate(r))
                   + "</tr>" for r in rows)
    return wrap(f"<table><tr>{h}</tr>{body}</table>")


def _decoder(run_dir: Path):
    """token id -> text, from RUN/tokenizer.json (falls back to '#id')."""
    p = run_dir / "tokenizer.json"
    dec = None
    try:
        from moelab.data.tokenizer import Tokenizer as MTok  # type: ignore

        tok = MTok.load(p)
        dec = lambda i: tok.decode([i])  # noqa: E731
    except Exception:  # noqa: BLE001 - the data module may be absent or the file in another format
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(p))
            dec = lambda i: tok.decode([i])  # noqa: E731
        except Exception:  # noqa: BLE001
            dec = None
    return (lambda i: H.visible_whitespace(dec(i))) if dec else (lambda i: f"#{i}")


def _missing(ra: RunAnalysis) -> str:
    why = ra.trace_error or "no routing trace was taken (run with tracing enabled)"
    return f'<p class="missing">Not available: {html.escape(why)}</p>'


def _summary_section(ra: RunAnalysis, s: "Section") -> None:
    """The ten-second answer, from summary.json (falling back to the last eval record)."""
    summ = ra.summary_json or {}
    ev = ra.evals[-1] if ra.evals else {}
    ppl, step = summ.get("val_ppl", ev.get("val_ppl")), summ.get("eval_step", ev.get("step"))
    pd = summ.get("per_domain") or ev.get("per_domain") or {}
    dom = ", ".join(f"{html.escape(d)} <b>{_fmt(v.get('ppl'))}</b>" for d, v in pd.items())
    at = f" at step {step}" if step is not None else ""
    s.body.append(f"<p class='lead'>Validation perplexity <b>{_fmt(ppl)}</b>{at}" + (f" ({dom})" if dom else "")
                  + f" after {H.fmt_num(summ.get('step'))} of {H.fmt_num(summ.get('steps'))} steps.</p>")
    span = summ.get("balance_steps")
    over = f"steps {span[0]}–{span[1]}" if span else "the last steps"
    rows = [["load max/mean", summ.get("load_max_over_mean"), f"1 = perfect balance; mean over MoE layers, {over}"],
            ["load CV", summ.get("load_cv"), "std/mean of expert loads, same steps"],
            ["tokens/s", summ.get("tokens_per_s"), "training throughput, last session"],
            ["parameters", H.fmt_num(summ.get("params_total")), f"{H.fmt_num(summ.get('params_active'))} active per token"]]
    s.body.append(table_html(["quantity", "value", "what it means"], rows))
    for w in summ.get("warnings") or []:
        s.body.append(f"<p class='warn'>{html.escape(w)}</p>")
    name, diff = H.nearest_preset(ra.config or {})
    if name is None:
        return
    if not diff:
        s.body.append(f"<p>Config: the <code>{html.escape(name)}</code> preset, unchanged.</p>")
        return
    rows = [[H.short_key(k), str(a), str(b)] for k, (a, b) in diff.items()]
    head = f"<h3>Config differences from the <code>{html.escape(name)}</code> preset ({len(rows)} keys)</h3>"
    shown, rest = rows[:12], rows[12:]
    s.body.append(head + table_html(["key", "this run", name], shown) + (
        f"<details><summary>{len(rest)} more</summary>{table_html(['key', 'this run', name], rest)}</details>"
        if rest else ""))


def build_sections(ra: RunAnalysis) -> list[Section]:
    secs = {sid: Section(sid, t) for sid, t in [
        ("summary", "Summary"), ("config", "Raw configuration and summary.json"), ("loss", "Loss curves"),
        ("balance", "Balance over training"), ("load", "Expert load over training"),
        ("specialisation", "Domain specialisation"), ("coactivation", "Expert co-activation"),
        ("stability", "Routing stability between checkpoints"), ("geometry", "Router–expert geometry"),
        ("consistency", "Routing consistency across tokens and layers"),
        ("variable_k", "Experts per token"),
    ]}
    _summary_section(ra, secs["summary"])
    # ---- config (folded away: the summary above has what differs)
    s = secs["config"]
    summ = ra.summary_json or {}
    rows = [[k, v] for k, v in summ.items() if not isinstance(v, (dict, list))]
    pd = summ.get("per_domain") or {}
    body = table_html(["key", "value"], rows) if rows else ""
    if pd:
        body += table_html(["domain", "val loss", "val ppl"], [[d, v.get("loss"), v.get("ppl")] for d, v in pd.items()])
    s.body.append(f"<details><summary>summary.json ({len(rows)} values)</summary>{body}</details>")
    s.body.append("<details><summary>config.json</summary><pre>"
                  + html.escape(json.dumps(ra.config, indent=1, default=str)) + "</pre></details>")
    # ---- loss
    s = secs["loss"]
    if ra.metrics or ra.evals:
        s.images.append(("loss.png", P.png_bytes(P.loss_curves(ra.metrics, ra.evals)), f"Training loss at each of {len(ra.metrics)} steps, validation loss at {len(ra.evals)} evaluations. "
                         "A validation curve that turns up while training loss keeps falling is overfitting; a gap "
                         "between domains shows which text the model finds harder."))
    else:
        s.body.append('<p class="missing">metrics.jsonl and eval.jsonl are empty.</p>')
    # ---- balance trajectories
    s = secs["balance"]
    s.paper = 'Balance tracked over training, cf. "Three Phases of Expert Routing" (Mouzouni): surge, stabilisation, relaxation.'
    traj = ra.trajectories()
    layer_ids = sorted({int(x["layer"]) for r in ra.metrics for x in (r.get("layers") or [])})
    labels = {"load_max_over_mean": "max load / mean load", "load_cv": "load CV (std/mean)",
              "dropped_frac": "dropped fraction of slots", "router_entropy": "router entropy (nats)",
              "experts_per_token": "experts per token", "unused_experts": "unused experts",
              "bias_norm": "aux-free bias L2 norm"}
    flat = []
    for key, d in traj.items():
        if not H.is_informative(d["values"]):
            flat.append(f"{labels[key]} = {_fmt(H.constant_value(d['values']))}")
            continue
        s.images.append((f"traj_{key}.png", P.png_bytes(P.trajectory(d["steps"], d["values"], layer_ids, labels[key],
                                                                    labels[key] + " per MoE layer")),
                         f"One line per MoE layer, {len(d['steps'])} logged steps. {TRAJ_HINTS[key]}"))
    if flat:
        s.body.append("<p class='note'>Constant over the whole run in every layer (not plotted): "
                      + html.escape("; ".join(flat)) + ".</p>")
    if not traj:
        s.body.append('<p class="missing">No per-layer routing statistics in metrics.jsonl.</p>')
    # ---- load heatmaps
    s = secs["load"]
    hm = [(l, *M.load_history(ra.metrics, l)) for l in layer_ids]
    hm = [(l, st, f) for l, st, f in hm if len(st) > 1]
    if hm:
        s.images.append(("load_heatmap.png", P.png_bytes(P.load_heatmaps(hm)),
                         "Rows are experts, columns logged steps. Even colour down a column is balance; a bright row is an "
                         "expert taking more than its share, a dark row one that stopped receiving tokens."))
    else:
        s.body.append('<p class="missing">Not enough steps with expert counts in metrics.jsonl.</p>')

    traced = sorted(ra.trace_results)
    if not traced:
        for sid in SECTION_IDS[SECTION_IDS.index("specialisation"):]:
            secs[sid].body.append(_missing(ra))
        return [secs[i] for i in SECTION_IDS]
    last = ra.trace_results[traced[-1]]
    step = traced[-1]
    dec = _decoder(ra.run_dir)
    domains = last["domains"] or ["all"]
    L = last["layers"]
    # ---- specialisation
    s = secs["specialisation"]
    s.paper = ("Specialisation score = I(expert; domain) / H(domain) over routed slots; cf. OLMoE "
               "(Muennighoff et al., 2024) domain specialisation and Liang et al. 2025 (domain-specialised experts).")
    s.images.append(("domain_heatmap.png", P.png_bytes(P.matrix_heatmaps(
        [(f"layer {x['layer']} (score {_fmt(x['specialisation'], 3)})", M.domain_distribution(x["domain_counts_EN"])[:, :len(domains)])
         for x in L], "domain", "expert", "share of domain's slots", xticklabels=domains)),
        f"At step {step}; each domain's column sums to 1. A column concentrated on a few experts means those "
        "experts specialise in that domain; columns that look alike mean routing ignores the domain."))
    series = {f"step {st}": [x["specialisation"] for x in ra.trace_results[st]["layers"]] for st in traced}
    s.images.append(("specialisation.png", P.png_bytes(P.per_layer_bars(
        [x["layer"] for x in L], series, "normalised MI", "Specialisation score per layer", (0, 1))),
        "0: the expert does not depend on the domain; 1: the domain determines the expert. Compare the "
        "checkpoints to see whether specialisation grows during training and in which layers."))
    for x in L:
        rows = [[f"expert {e}", int(x["counts"][e]), ", ".join(f"‹{dec(i)}› ({c}, {sh:.0%})" for i, c, sh in tt)]
                for e, tt in enumerate(x["top_tokens"])]
        s.body.append(f"<h3>Layer {x['layer']}: top tokens per expert</h3><p class='note'>‹token› (count, share of "
                      "the token's occurrences routed here); ␣ is a space, ↵ a newline, ⇥ a tab.</p>"
                      + table_html(["expert", "slots", "top tokens"], rows))
    # ---- co-activation
    s = secs["coactivation"]
    s.paper = "Co-activation P(j | i) of experts i, j for the same token, as in OLMoE (Muennighoff et al., 2024)."
    s.images.append(("coactivation.png", P.png_bytes(P.matrix_heatmaps(
        [(f"layer {x['layer']}", x["coactivation_EE"]) for x in L], "expert j", "expert i", "P(j routed | i routed)",
        vmin=0, vmax=1)), f"At step {step}; row i shows how often each expert j is also chosen when i is. Bright cells off the "
        "diagonal are experts chosen together (complementary or redundant); a flat matrix is independent choice."))
    # ---- stability
    s = secs["stability"]
    s.paper = "Router saturation as in OLMoE (Muennighoff et al., 2024): share of final-checkpoint experts already chosen."
    if ra.stability:
        lids = [r["layer"] for r in ra.stability[0]["layers"]]
        xs = [r["step"] for r in ra.stability]
        chg = {f"layer {l}": [r["layers"][j]["changed_frac"] for r in ra.stability] for j, l in enumerate(lids)}
        sat = {f"layer {l}": [r["saturation_vs_final"][j]["saturation"] for r in ra.stability] for j, l in enumerate(lids)}
        s.images.append(("stability_changed.png", P.png_bytes(P.series_by_step(
            xs, chg, "checkpoint step (vs the next traced one)", "fraction of tokens", "Tokens whose expert set changed",
            (0, 1))), "Share of traced tokens routed to a different set of experts at the next traced checkpoint. "
                               "Falling towards 0 means routing has settled; late changes mean experts are still "
                               "being reassigned."))
        s.images.append(("stability_saturation.png", P.png_bytes(P.series_by_step(
            xs, sat, "checkpoint step", "router saturation", f"Router saturation vs step {traced[-1]}", (0, 1))),
            "Share of the last checkpoint's expert choices already made at each step; values near 1 early on "
            "mean routing was decided early in training (as OLMoE observed)."))
        rows = [[f"{r['step']} → {r['reference_step']}", *[x["changed_frac"] for x in r["layers"]]] for r in ra.stability]
        s.body.append(table_html(["checkpoints", *[f"layer {l} changed" for l in lids]], rows))
    else:
        s.body.append('<p class="missing">Needs traces of at least two checkpoints.</p>')
    # ---- geometry
    s = secs["geometry"]
    s.paper = ('"Routers Learn the Geometry of Their Experts": cosine between each router row and the mean hidden '
               "state routed to it, and between router rows.")
    geo = [x for x in L if "geometry" in x]
    if geo:
        s.images.append(("geometry_router_hidden.png", P.png_bytes(P.per_expert_bars(
            [(x["layer"], x["geometry"]["router_hidden_cos_E"]) for x in geo], "cosine", "router row vs mean routed hidden")),
            "Positive bars: each expert's router row points towards the tokens it receives (the router has learned "
            "its experts' geometry); bars near 0: routing is not aligned with the hidden states."))
        s.images.append(("geometry_router_router.png", P.png_bytes(P.matrix_heatmaps(
            [(f"layer {x['layer']}", x["geometry"]["router_router_cos_EE"]) for x in geo], "expert", "expert",
            "cosine of router rows", vmin=-1, vmax=1)), "Off-diagonal cells near 0 mean the router tells its experts apart; bright pairs are experts with "
            "nearly the same router direction, which compete for the same tokens."))
        s.body.append(table_html(["layer", "mean cos(router, routed hidden)", "mean off-diagonal cos(router, router)"],
                                 [[x["layer"], x["geometry"]["mean_router_hidden_cos"],
                                   x["geometry"]["mean_offdiag_router_cos"]] for x in geo]))
    else:
        s.body.append('<p class="missing">The router has no single (experts x d_model) weight matrix, or hidden '
                      "states were not captured.</p>")
    # ---- consistency
    s = secs["consistency"]
    s.paper = ('Local routing consistency, "Not All Models Suit Expert Offloading" (Liang et al., 2025): SRP '
               "(best fixed group of k experts per segment) and SCH (optimal cache of 2k experts).")
    s.images.append(("consistency.png", P.png_bytes(P.per_layer_bars(
        [x["layer"] for x in L], {"consecutive-token Jaccard": [x["consecutive_overlap"] for x in L],
                                  f"SRP (segment {L[0]['srp_seg_len']})": [x["srp"] for x in L],
                                  "SCH (cache 2k)": [x["sch"] for x in L]},
        "score", "Local routing consistency per layer", (0, 1))), "Higher bars: neighbouring tokens reuse the same experts, so expert offloading and caching need "
        "fewer loads (Liang et al. 2025); compare layers to see where routing is most local."))
    alc = last["adjacent_layer_consistency"]
    if len(alc):
        s.body.append("<h3>Across adjacent layers</h3>" + table_html(
            ["layers", "NMI(top-1 expert at l; at l+1)"],
            [[f"{L[i]['layer']} → {L[i + 1]['layer']}", v] for i, v in enumerate(alc)]))
    # ---- variable k
    s = secs["variable_k"]
    s.paper = 'Cf. "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (top-p routing).'
    used = {int(np.flatnonzero(np.asarray(x["experts_per_token_hist"]))[0]) for x in L
            if np.count_nonzero(x["experts_per_token_hist"]) == 1}
    if len(used) == 1 and all(np.count_nonzero(x["experts_per_token_hist"]) == 1 for x in L):
        s.body.append(f"<p class='note'>Every traced token used exactly {used.pop()} experts in every layer "
                      "(fixed k): no distribution to plot.</p>")
    else:
        s.images.append(("experts_per_token_hist.png", P.png_bytes(P.per_expert_bars(
            [(x["layer"], np.asarray(x["experts_per_token_hist"], float) / max(1, int(np.sum(x["experts_per_token_hist"]))))
             for x in L], "share of tokens", "experts per token", xlabel="experts used by the token")),
            f"At step {step}. A spread-out histogram means the router gives some tokens more compute than others; "
            "a single bar means it behaves like fixed top-k."))
    evl = [(x["layer"], x["experts_vs_loss"]) for x in L if "experts_vs_loss" in x]
    if evl:
        s.images.append(("experts_vs_loss.png", P.png_bytes(P.experts_vs_loss(evl)),
                         "If the router spends more experts on harder tokens, loss rises with the number of experts used; a "
                         "flat line means the extra experts are not going to the hard tokens."))
    else:
        s.body.append("<p>Every token used the same number of experts (fixed k): no loss relation to show.</p>")
    return [secs[i] for i in SECTION_IDS]


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>"
             + "".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections) + "</nav>"]
    for s in sections:
        parts.append(f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>")
        if s.paper:
            parts.append(f"<p class='paper'>{html.escape(s.paper)}</p>")
        for name, png, cap in s.images:
            b64 = base64.b64encode(png).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(cap)}' "
                         f"data-file='{html.escape(name)}'><figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.extend(s.body)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, analysis: RunAnalysis | None = None,
                 **analyze_kw: Any) -> Path:
    """Analyse ``run_dir`` (unless ``analysis`` is given) and write ``report.html`` plus the PNGs.

    Output goes to ``out_dir`` (default ``RUN/report``). Returns the HTML path.
    """
    run_dir = Path(run_dir)
    ra = analysis if analysis is not None else analyze_run(run_dir, **analyze_kw)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(ra)
    for s in sections:
        for name, png, _ in s.images:
            (out / name).write_bytes(png)
    page = out / "report.html"
    page.write_text(render_html(f"moelab routing report: {run_dir.name}", sections))
    return page

"""Reports and comparisons rendered from a short real training run (plus CLI and bad input)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moelab.analysis import analyze_run, compare_runs, write_comparison, write_report
from moelab.analysis.report import SECTION_IDS
from moelab.cli.main import main


@pytest.fixture(scope="module")
def report(micro_run, tmp_path_factory):
    """The full report of the micro run (two traced checkpoints), rendered once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        from analysis_helpers import install_tiny_moe

        install_tiny_moe(mp)
        ra = analyze_run(micro_run, num_windows=6)
    out = tmp_path_factory.mktemp("report")
    return ra, write_report(micro_run, out, analysis=ra)


def test_analysis_of_the_micro_run(report):
    ra, _ = report
    assert sorted(ra.traces) == [4, 8]
    assert ra.trace_error is None
    s = json.loads((ra.run_dir / "analysis" / "analysis.json").read_text())
    assert s["traced_steps"] == [4, 8]
    lay = s["analyses"]["8"]["layers"]
    assert [x["layer"] for x in lay] == [0, 1]
    for x in lay:
        assert x["experts_per_token_mean"] == 2.0
        assert 0.0 <= x["specialisation"] <= 1.0
        assert -1.0 <= x["router_hidden_cos"] <= 1.0
    st = s["stability"][0]
    assert st["step"] == 4 and st["reference_step"] == 8
    assert all(0.0 <= r["changed_frac"] <= 1.0 for r in st["layers"])
    assert (ra.run_dir / "analysis" / "trace_step_000004.safetensors").is_file()


def test_report_has_every_section_and_image(report):
    ra, page = report
    text = page.read_text()
    for sid in SECTION_IDS:
        assert f"<section id='{sid}'>" in text, sid
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    embedded = sorted(re.findall(r"data-file='([^']+)'", text))
    assert pngs == embedded
    expected = {"loss.png", "traj_load_cv.png", "load_heatmap.png", "domain_heatmap.png", "specialisation.png",
                "coactivation.png", "stability_changed.png", "stability_saturation.png",
                "geometry_router_hidden.png", "geometry_router_router.png", "consistency.png",
                }
    assert expected <= set(pngs)
    for p in page.parent.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: no scripts, no external resources
    assert "<script" not in text and not re.search(r"(src|href)=['\"]https?:", text)
    assert text.count("data:image/png;base64,") == len(pngs)
    assert "params_active" in text  # parameter counts from summary.json
    assert "Not available" not in text


def test_report_html_is_well_formed(report):
    from html.parser import HTMLParser

    _, page = report
    void = {"meta", "img", "br", "hr", "link", "input"}

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack = []

        def handle_starttag(self, tag, attrs):
            if tag not in void:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
            self.stack.pop()

    c = Checker()
    c.feed(page.read_text())
    assert c.stack == []


def _chromium():
    from browser import find_chromium

    path = find_chromium()
    if path is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt-get where it can)")
    return path


def _check_renders(page):
    from browser import render

    got = render(page, _chromium())
    assert got["images"] > 0 and got["broken"] == [], got
    assert got["errors"] == [] and got["console"] == [], got
    assert got["overflow"] <= 0, got  # the page body never scrolls sideways
    return got


def test_report_renders_in_headless_chromium(report):
    _, page = report
    got = _check_renders(page)
    assert got["images"] == len(list(page.parent.glob("*.png")))


def test_compare_renders_in_headless_chromium(micro_run, tmp_path):
    other = _fake_copy(micro_run, tmp_path / "other", val_loss=1.5)
    page, _ = write_comparison([micro_run, other], tmp_path / "cmp")
    assert _check_renders(page)["images"] == 3


def test_browser_probe_catches_a_broken_image(tmp_path):
    """The probe is able to fail: a missing image and a console error are reported."""
    from browser import render

    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    "<img src='missing.png' alt='gone'><script>console.error('boom')</script></body></html>")
    got = render(page, _chromium())
    assert got["broken"] == ["gone"] and got["console"] == ["boom"] and got["errors"]
    assert got["overflow"] == 0
    wide = tmp_path / "wide.html"  # a table wider than the window, not in a scrolling box
    wide.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><table><tr>"
                    + "<td>a_long_cell_value_that_does_not_wrap</td>" * 60 + "</tr></table></body></html>")
    assert render(wide, _chromium())["overflow"] > 1000


def test_report_without_traces_says_why(micro_run, tmp_path, capsys):
    assert main(["report", str(micro_run), "--no-trace", "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.html").read_text()
    for sid in SECTION_IDS:
        assert f"<section id='{sid}'>" in text
    assert text.count("Not available") == len(SECTION_IDS) - SECTION_IDS.index("specialisation")


def _fake_copy(src: Path, dst: Path, **summary) -> Path:
    dst.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "summary.json"):
        shutil.copy(src / name, dst / name)
    s = json.loads((dst / "summary.json").read_text())
    s.update(summary)
    (dst / "summary.json").write_text(json.dumps(s))
    return dst


def test_compare_runs(micro_run, tmp_path):
    other = _fake_copy(micro_run, tmp_path / "other", val_loss=1.5, val_ppl=4.48, params_active=123)
    bare = tmp_path / "bare"  # no summary: values fall back to eval.jsonl / metrics.jsonl
    bare.mkdir()
    for name in ("config.json", "metrics.jsonl", "eval.jsonl"):
        shutil.copy(micro_run / name, bare / name)
    comp = compare_runs([micro_run, other, bare])
    rows = {r.name: r for r in comp.rows}
    assert rows["other"].val_loss == 1.5 and rows["other"].params_active == 123
    summary = json.loads((micro_run / "summary.json").read_text())
    assert rows[micro_run.name].load_cv == pytest.approx(summary["load_cv"])
    last_layers = json.loads((micro_run / "metrics.jsonl").read_text().splitlines()[-1])["layers"]
    assert rows["bare"].load_cv == pytest.approx(sum(x["load_cv"] for x in last_layers) / len(last_layers))
    last_eval = json.loads((micro_run / "eval.jsonl").read_text().splitlines()[-1])
    assert rows["bare"].val_loss == pytest.approx(last_eval["val_loss"])
    assert rows["bare"].tokens_per_s is not None and rows["bare"].params_active is None
    md = comp.to_markdown()
    lines = md.splitlines()
    assert len(lines) == 2 + 3
    assert "code loss" in lines[0] and "prose ppl" in lines[0] and "tokens/s" in lines[0]
    page, md2 = write_comparison([micro_run, other], tmp_path / "cmp")
    html = page.read_text()
    assert "<section id='table'>" in html and html.count("data:image/png;base64,") == 3
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == md2.strip()


def test_cli(micro_run, tmp_path, capsys, tiny_moe):
    assert main(["analyze", str(micro_run), "--steps", "8", "--windows", "4", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"traced_steps": [\n  8\n ]' in out
    summary = json.loads(out[:out.rindex("}") + 1])
    assert main(["analyze", str(micro_run), "--steps", "4", "8", "--windows", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("routing at step 8 (" + table[0].split("(", 1)[1]) and "checkpoints traced: 4, 8" in table[0]
    assert table[1].split() == ["layer", "max/mean", "CV", "unused", "special.", "changed", "consec.", "SRP", "SCH"]
    row0 = table[3].split()
    layer0 = summary["analyses"]["8"]["layers"][0]  # same seed and windows: the same numbers as the JSON
    assert row0[0] == "0" and float(row0[1]) == pytest.approx(layer0["max_over_mean"], abs=5e-4)
    assert float(row0[4]) == pytest.approx(layer0["specialisation"], abs=5e-4)
    assert len(table) < 12
    assert main(["compare", str(micro_run), str(micro_run), "--out", str(tmp_path / "cmp")]) == 0
    assert "| run |" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert main(["analyze", str(empty)]) == 2
    assert "no checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------- what the report leads with


def test_report_leads_with_the_summary(report):
    ra, page = report
    text = page.read_text()
    summary = json.loads((ra.run_dir / "summary.json").read_text())
    first = text.index("<section id='summary'>")
    assert first < text.index("<section id='config'>") < text.index("<section id='loss'>")
    lead = text[first:text.index("</section>", first)]
    assert f"Validation perplexity <b>{summary['val_ppl']:.4g}</b> at step {summary['eval_step']}" in lead
    for dom, v in summary["per_domain"].items():
        assert f"{dom} <b>{v['ppl']:.4g}</b>" in lead
    assert f"{summary['params_total']:,}" in lead and "load max/mean" in lead and "tokens/s" in lead
    assert "Config differences from the" in lead and "<td class=\"l\">train.steps</td>" in lead
    assert "<details><summary>config.json</summary>" in text  # the raw config is folded away


def test_constant_series_are_stated_not_plotted(report):
    _, page = report
    text = page.read_text()
    assert "traj_dropped_frac.png" not in text and "traj_experts_per_token.png" not in text
    assert re.search(r"Constant over the whole run.*dropped fraction of slots = 0.*experts per token = 2", text)
    assert "used exactly 2 experts" in text and "experts_per_token_hist.png" not in text


def test_headline_helpers():
    from moelab.analysis import headline as H

    assert H.visible_whitespace(" def\n\tx") == "␣def↵⇥x"
    assert not H.is_informative([0.0, 0.0]) and not H.is_informative([2, 2, 2]) and H.is_informative([1, 2])
    assert H.config_diff({"train": {"lr": 1, "steps": 2}}, {"train": {"lr": 1, "steps": 3}}) == {"train.steps": (2, 3)}
    a, b = {"model": {"moe": {"router": "softmax_topk", "k": 2}}}, {"model": {"moe": {"router": "sigmoid", "k": 2}}}
    keys = H.differing_keys([a, b])
    assert keys == ["model.moe.router"] and H.run_label("r1", b, keys) == "r1 (moe.router=sigmoid)"
    y = [1.0, 3.0, 1.0, 3.0]
    ema, acc, w = [], 0.0, 0.0  # oracle: the debiased EMA by hand, window 3 (alpha 0.5)
    for v in y:
        acc, w = 0.5 * acc + 0.5 * v, 0.5 * w + 0.5
        ema.append(acc / w)
    assert H.smooth(y, window=3).tolist() == pytest.approx(ema)


def test_compare_labels_and_budget_warnings(micro_run, tmp_path):
    other = _fake_copy(micro_run, tmp_path / "lr", step=4)
    cfg = json.loads((other / "config.json").read_text())
    cfg["train"]["lr"] = 0.5
    (other / "config.json").write_text(json.dumps(cfg))
    comp = compare_runs([micro_run, other])
    assert comp.labels() == [f"{micro_run.name} (train.lr={json.loads((micro_run / 'config.json').read_text())['train']['lr']})",
                             "lr (train.lr=0.5)"]
    warns = comp.warnings()
    assert len(warns) == 1 and warns[0].startswith("The runs differ in steps")
    md = comp.to_markdown()
    assert md.startswith("> warning: The runs differ in steps") and "| lr (train.lr=0.5) |" in md
    assert compare_runs([micro_run, micro_run]).warnings() == []
    assert "smoothed (EMA), raw values faint" in comp.to_html()


# ----------------------------------------------------------------- captions, heatmaps, tokens (issue 22)

_STOP = {"the", "and", "that", "this", "with", "from", "each", "per", "over", "between", "across", "step", "steps"}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z\-]+", text.lower()) if len(w) > 3 and w not in _STOP}


def test_captions_add_to_the_title_instead_of_repeating_it(report):
    """Every figure caption says something its section title does not: at least 8 words of its own."""
    ra, _ = report
    from moelab.analysis.report import build_sections

    n = 0
    for s in build_sections(ra):
        for name, _, cap in s.images:
            new = _words(cap) - _words(s.title) - _words(name.replace("_", " "))
            assert len(new) >= 8, (s.title, name, cap)
            n += 1
    assert n >= 10


def test_compare_captions_say_what_to_look_for(micro_run, tmp_path):
    comp = compare_runs([micro_run, _fake_copy(micro_run, tmp_path / "o", val_loss=1.5)])
    for name, _, cap in comp.figures():
        assert len(_words(cap) - _words(name.replace("_", " "))) >= 8, cap


def test_heatmap_ticks_are_integers_and_titles_legible():
    import numpy as np

    from moelab.analysis import plots as P

    fig = P.matrix_heatmaps([(f"layer {i}", np.random.default_rng(i).random((16, 3))) for i in range(4)],
                            "domain", "expert", "share", xticklabels=["code", "prose", "math"])
    r = fig.canvas.get_renderer()
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == 4
    for ax in heatmaps:
        ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert ticks and all(t.isdigit() for t in ticks), ticks  # expert indices, not 2.5, 7.5
        assert ax.title.get_fontsize() >= 9
        tb = ax.title.get_window_extent(r)
        assert tb.x0 >= ax.bbox.x0 - 30 and tb.x1 <= ax.bbox.x1 + 30  # the title fits over its own heatmap
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_top_token_tables_show_whitespace(report):
    _, page = report
    text = page.read_text()
    tables = re.findall(r"top tokens per expert.*?</table>", text, re.S)
    assert tables and any("␣" in t for t in tables)  # the byte-level corpus routes spaces
    assert not re.search(r"‹ ›|‹\n›", text)  # never a bare space or newline between the guillemets


class _TTY:
    """A terminal-like stderr (tqdm shows its bar only on a terminal)."""

    def __init__(self):
        import io

        self.buf = io.StringIO()

    def write(self, s):
        return self.buf.write(s)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_eval_and_analyze_show_progress_on_a_terminal(micro_run, tmp_path, monkeypatch, tiny_moe):
    tty = _TTY()
    monkeypatch.setattr("sys.stderr", tty)
    assert main(["eval", str(micro_run), "--max-batches", "1"]) == 0
    assert "evaluating" in tty.buf.getvalue() and "batch" in tty.buf.getvalue()
    import shutil as sh

    run = tmp_path / "copy"
    sh.copytree(micro_run, run, ignore=sh.ignore_patterns("analysis"))  # nothing traced yet
    assert main(["analyze", str(run), "--steps", "8", "--windows", "2"]) == 0
    assert "tracing checkpoints" in tty.buf.getvalue()

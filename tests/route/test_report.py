"""The `moelab route compare` page: the shared style sheet, a real table, metric definitions, plots
whose labels cannot cover the data, full category names, and a headless-Chromium render."""

import sys
from pathlib import Path

import numpy as np
import pytest

from moelab.htmlpage import CSS
from moelab.route.data import RoutingDataset
from moelab.route.evaluate import METRIC_DEFINITIONS, bars_figure, compare, curves_figure, write_report
from moelab.route.synthetic import topic_dataset

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))  # the browser probe

LONG_CATEGORY = "high_school_macroeconomics_and_public_policy"
MODELS = ["meta-llama/Llama-3.1-70B-Instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"]


@pytest.fixture(scope="module")
def res():
    ds = topic_dataset(n=240, n_models=2, n_topics=2, seed=7)
    cats = [LONG_CATEGORY if c == ds.categories[0] else c for c in ds.categories]
    ds = RoutingDataset(ds.name, ds.prompt_ids, ds.texts, ds.sources, cats, MODELS, ds.scores_PM, ds.costs_PM)
    return compare(ds, ["random", "cheapest", "knn", "threshold"], n_boot=20, feature_dim=8, log=lambda s: None,
                   tune=False)


@pytest.fixture(scope="module")
def page(res, tmp_path_factory):
    return write_report(res, tmp_path_factory.mktemp("route"))["html"]


def test_the_page_uses_the_shared_style_and_a_real_table(page, res):
    text = page.read_text()
    assert CSS in text and "<pre" not in text
    assert "<div class='tablewrap'><table>" in text  # scrolls in its own box if too wide
    for name in res["routers"]:
        assert f'<td class="l">{name}</td>' in text
    assert text.index("Highest AIQ") < text.index("<section id='table'>")  # the answer first


def test_every_metric_has_a_one_line_definition(page):
    text = page.read_text()
    names = [n for n, _ in METRIC_DEFINITIONS]
    for n in ("AIQ", "APGR", "CPT", "arena score", "Q@budget"):
        assert n in names and f"<dt>{n}</dt><dd>" in text
    assert all("\n" not in d and len(d) > 30 for _, d in METRIC_DEFINITIONS)


def test_curves_name_single_models_in_a_legend_not_over_the_markers(res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = curves_figure(res, plt)
    ax = fig.axes[0]
    assert len(ax.texts) == 0  # no annotation placed next to (or on) a marker
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [f"{m} (single model)" for m in MODELS] == labels[-2:]  # full names
    r = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(r).x0 >= ax.bbox.x1  # outside the data area
    plt.close(fig)


def test_category_names_are_shown_in_full(res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = bars_figure(res, plt)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any(t.startswith(LONG_CATEGORY + " (n=") for t in ticks), ticks
    plt.close(fig)


def test_the_page_renders_in_headless_chromium(page):
    from browser import check_page

    assert check_page(page)["images"] == 2


def test_compare_shows_its_stages_in_a_progress_bar(capsys):
    ds = topic_dataset(n=120, n_models=2, n_topics=2, seed=1)
    compare(ds, ["cheapest", "knn"], n_boot=0, feature_dim=8, log=lambda s: None, tune=False, progress=True)
    err = capsys.readouterr().err
    for stage in ("fitting tfidf-svd on", "features of", "test prompts", "oracle", "fitting and sweeping knn"):
        assert stage in err, (stage, err[-500:])
    assert "route compare" in err and "6/6" in err
    compare(ds, ["cheapest"], n_boot=0, log=lambda s: None, tune=False, progress=False)
    assert capsys.readouterr().err == ""

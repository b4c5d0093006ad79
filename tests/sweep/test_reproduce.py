"""Claims: the verdict logic on hand-made results, the registry, and one claim end to end on fake runs."""

import sys
from pathlib import Path

import pytest

from moelab.errors import MoelabError
from moelab.sweep.reproduce import (
    Claim, Condition, ConditionResult, all_claims, combine, decide, evaluate_claim, demote_headings, get_claim, read_sections, update_docs,
)
from moelab.sweep.stats import paired_compare

sys.path.insert(0, str(Path(__file__).parent))
from test_leaderboard import fake_sweep  # noqa: E402

NOISE = [0.0, 0.3, -0.2, 0.1]


def _cmp(delta, jitter=0.001, margin=0.01):
    """A paired comparison of A - B with mean ``delta`` and a small spread."""
    a = [3.0 + n + delta + jitter * (i % 2) for i, n in enumerate(NOISE)]
    b = [3.0 + n for n in NOISE]
    return paired_compare(a, b, margin=margin)


@pytest.mark.parametrize("relation,delta,jitter,expected", [
    ("better", -0.05, 0.001, "reproduced"),      # A clearly lower loss
    ("better", +0.05, 0.001, "contradicted"),    # A clearly worse
    ("better", 0.0005, 0.001, "contradicted"),   # equivalent within the margin: no gain
    ("better", -0.01, 0.08, "inconclusive"),     # too noisy
    ("no_worse", +0.005, 0.001, "reproduced"),   # slightly worse but inside the margin
    ("no_worse", +0.05, 0.001, "contradicted"),  # worse by more than the margin
    ("no_worse", +0.01, 0.05, "inconclusive"),
    ("equivalent", 0.0005, 0.001, "reproduced"),
    ("equivalent", 0.05, 0.001, "contradicted"),
    ("equivalent", 0.0, 0.1, "inconclusive"),
])
def test_each_relation_gives_each_verdict(relation, delta, jitter, expected):
    c = Condition("a", "b", "val_loss", relation, 0.01)
    assert decide(c, _cmp(delta, jitter), 4, 9).verdict == expected


def test_higher_is_better_metrics_flip_the_direction():
    c = Condition("a", "b", "tokens_per_s", "better", 1.0)
    a, b = [110.0, 111.0, 112.0], [100.0, 100.5, 101.2]
    assert decide(c, paired_compare(a, b, margin=1.0), 3, None).verdict == "reproduced"
    assert decide(c, paired_compare(b, a, margin=1.0), 3, None).verdict == "contradicted"


def test_combine_needs_every_condition():
    def r(v, n=None):
        return ConditionResult(Condition("a", "b", "val_loss", "better", 0.01), v, None, None, 3, n)
    assert combine([r("reproduced"), r("reproduced")]) == ("reproduced", None)
    assert combine([r("reproduced"), r("contradicted")]) == ("contradicted", None)
    assert combine([r("reproduced"), r("inconclusive", 7), r("inconclusive", 12)]) == ("inconclusive", 12)


def test_registry_has_the_ten_claims_and_each_plans():
    names = {c.name for c in all_claims()}
    assert {"unipool", "deepseekmoe", "top-p", "remoe", "equifinality", "aux-free", "null-experts",
            "expert-choice", "erc", "chain-of-experts"} <= names
    for c in all_claims():
        spec = c.spec()
        assert len(spec.expand()) == len(c.variants) * len(c.seeds)
        assert c.paper and c.statement
    with pytest.raises(MoelabError, match="claim"):
        get_claim("nope")
    assert get_claim("unipool").spec(scale="small").preset == "small"


def test_a_claim_is_decided_from_finished_runs(tmp_path):
    claim = Claim("demo", "Nobody 2026", "b beats a", [{"name": "a"}, {"name": "b"}],
                  [Condition("b", "a", "val_loss", "better", 0.01)])
    sweep = fake_sweep(tmp_path / "s", {"a": [3.0 + n for n in NOISE], "b": [2.9 + n for n in NOISE]})
    verdict, needed, rows = evaluate_claim(claim, sweep)
    assert verdict == "reproduced" and rows[0].seeds == 4 and rows[0].improvement[0] == pytest.approx(0.1)


def test_docs_page_keeps_other_claims_sections(tmp_path):
    page = tmp_path / "r.md"
    update_docs(page, "alpha", "## alpha: **reproduced**\n\ntext a\n")
    update_docs(page, "beta", "## beta: **inconclusive**\n\ntext b\n")
    update_docs(page, "alpha", "## alpha: **contradicted**\n\nnew a\n")
    text = page.read_text()
    assert text.startswith("# Reproductions") and "new a" in text and "text b" in text and "text a" not in text
    assert "| [alpha](#alpha) | **contradicted** |" in text and "| [beta](#beta) | **inconclusive** |" in text


def test_embedded_leaderboard_headings_never_split_a_claims_section(tmp_path):
    # The bug this guards: a section embedding a leaderboard ("# Sweep leaderboard", "## Pairwise") was
    # split at its "## Pairwise" heading, and the next claim's update overwrote the orphan part.
    page = tmp_path / "r.md"
    board = "# Sweep leaderboard: x\n\n| a |\n\n## Pairwise (val_loss)\n\n| pair A |"
    update_docs(page, "alpha", f"## alpha: **reproduced**\n\n{demote_headings(board)}\n")
    update_docs(page, "beta", f"## beta: **reproduced**\n\n{demote_headings(board.replace('pair A', 'pair B'))}\n")
    update_docs(page, "gamma", "## gamma: **contradicted**\n")
    secs = read_sections(page.read_text())
    assert list(secs) == ["alpha", "beta", "gamma"]
    assert "pair A" in secs["alpha"] and "pair B" in secs["beta"] and "#### Pairwise" in secs["alpha"]
    assert "\n## Pairwise" not in page.read_text()


def test_a_claims_wall_time_accumulates_over_the_commands_that_built_it(tmp_path):
    from moelab.sweep.reproduce import add_wall_time

    assert add_wall_time(tmp_path, 600.0) == 600.0
    assert add_wall_time(tmp_path, 2.5) == 602.5  # a re-run that only decides adds its own seconds

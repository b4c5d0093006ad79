import pytest

from moelab.errors import MoelabError
from moelab.sweep.spec import SweepSpec


def test_grid_times_seeds_with_exclusions():
    spec = SweepSpec.from_dict({
        "name": "s", "seeds": [0, 1],
        "base": {"train.steps": 10},
        "axes": {"moe.router": ["softmax_topk", "kmeans"], "moe.aux_loss": ["none", "switch"]},
        "exclude": [{"moe.router": "kmeans", "moe.aux_loss": "switch"}],
    })
    runs = spec.expand()
    assert len(runs) == 3 * 2
    groups = {r.group for r in runs}
    assert groups == {"router=softmax_topk-aux_loss=none", "router=softmax_topk-aux_loss=switch",
                      "router=kmeans-aux_loss=none"}
    r = runs[0]
    assert r.overrides["train.steps"] == 10 and r.overrides["train.seed"] == r.seed


def test_variants_cross_grid_and_names_are_stable():
    d = {"name": "v", "seeds": [3], "axes": {"moe.k": [1, 2]},
         "variants": [{"name": "a", "moe.aux_free_bias": True}, {"name": "b"}]}
    runs = SweepSpec.from_dict(d).expand()
    assert [r.name for r in runs] == ["a-k=1__seed3", "a-k=2__seed3", "b-k=1__seed3", "b-k=2__seed3"]
    assert runs[0].overrides["moe.aux_free_bias"] is True and "moe.aux_free_bias" not in runs[2].overrides
    assert [r.name for r in SweepSpec.from_dict(d).expand()] == [r.name for r in runs]


def test_load_toml_and_yaml(tmp_path):
    (tmp_path / "a.toml").write_text('seeds = [0]\n[axes]\n"moe.k" = [1, 2]\n')
    (tmp_path / "b.yaml").write_text("seeds: [0]\naxes:\n  moe.k: [1, 2]\n")
    a, b = SweepSpec.load(tmp_path / "a.toml"), SweepSpec.load(tmp_path / "b.yaml")
    assert a.name == "a" and [r.name for r in a.expand()] == [r.name for r in b.expand()]


@pytest.mark.parametrize("bad,msg", [
    ({"name": "x", "axis": {}}, "unknown sweep spec key"),
    ({"name": "x", "seeds": []}, "seeds is empty"),
    ({"name": "x", "axes": {"moe.k": []}}, "non-empty list"),
    ({"name": "x", "axes": {"moe.k": [1]}, "exclude": [{"moe.k": 1}]}, "empty grid"),
])
def test_bad_specs(bad, msg):
    with pytest.raises(MoelabError, match=msg):
        SweepSpec.from_dict(bad)

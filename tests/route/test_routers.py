"""Routers: beat random where the best model depends on the text, lose nothing when models are
equal, calibration, bandit regret, save/load round trip, unseen models, bad input."""

import numpy as np
import pytest

from moelab.errors import MoelabError
from moelab.route import MODEL_ROUTERS, build_router, load_router
from moelab.route.data import RoutingDataset
from moelab.route.evaluate import evaluate_sweep, sweep
from moelab.route.features import TfidfSvdFeaturizer
from moelab.route.synthetic import topic_dataset

LEARNED = ["knn", "linear", "mlp", "mf", "carrot", "routerdc", "category", "universal", "bandit", "sw-ranking", "irt"]
TWO_MODEL = ["threshold", "cascade"]
FAST = {"mlp": {"epochs": 15}, "mf": {"epochs": 15}, "routerdc": {"epochs": 10}, "bandit": {"epochs": 20},
        "universal": {"n_clusters": 6, "n_probe": 300}, "threshold": {"epochs": 15}, "irt": {"epochs": 10}}


@pytest.fixture(scope="module")
def topics():
    ds = topic_dataset(n=900, n_models=3, seed=0)
    tr, te = ds.split(0.33)
    feat = TfidfSvdFeaturizer(dim=32).fit(tr.require_texts())
    return tr, te, feat, feat.transform(tr.require_texts()), feat.transform(te.require_texts())


@pytest.fixture(scope="module")
def topics2():
    ds = topic_dataset(n=900, n_models=2, n_topics=2, seed=1)
    tr, te = ds.split(0.33)
    feat = TfidfSvdFeaturizer(dim=32).fit(tr.require_texts())
    return tr, te, feat, feat.transform(tr.require_texts()), feat.transform(te.require_texts())


def _aiq(name, tr, te, feat, xtr, xte):
    r = build_router(name, **FAST.get(name, {})).fit(tr, featurizer=feat, x_ND=xtr)
    return evaluate_sweep(sweep(r, te, xte if r.needs_features else None), te, n_boot=0)["metrics"]


def test_every_router_is_registered_with_a_paper():
    names = set(MODEL_ROUTERS.names())
    assert {"oracle", "random", "best-single", "cheapest", *LEARNED, *TWO_MODEL} <= names
    for e in MODEL_ROUTERS.entries():
        assert e.paper and e.obj.__doc__ is not None or e.name in ("best-single", "cheapest")


@pytest.mark.parametrize("name", LEARNED)
def test_learned_router_beats_random(topics, name):
    rnd = _aiq("random", *topics)
    got = _aiq(name, *topics)
    assert got["aiq"] > rnd["aiq"] + 0.05, (got["aiq"], rnd["aiq"])


@pytest.mark.parametrize("name", TWO_MODEL)
def test_two_model_router_beats_random(topics2, name):
    rnd = _aiq("random", *topics2)
    got = _aiq(name, *topics2)
    assert got["aiq"] > rnd["aiq"] + 0.05, (got["aiq"], rnd["aiq"])


@pytest.mark.parametrize("name", LEARNED + TWO_MODEL)
def test_equal_models_lose_nothing(name):
    ds = topic_dataset(n=200, n_models=2, seed=2, equal=True)
    tr, te = ds.split(0.4)
    r = build_router(name, **FAST.get(name, {})).fit(tr)
    for mu in (0.0, 0.5, 1.0):
        idx = r.route(te, tradeoff=mu)
        got = te.scores_PM[np.arange(te.n_prompts), idx].mean()
        paid = r.paid_cost(idx, te.costs_PM).mean()
        assert got == pytest.approx(te.scores_PM[:, 0].mean())
        if name != "cascade":  # a cascade pays the cheap attempt when it escalates
            assert paid == pytest.approx(te.costs_PM[:, 0].mean())


def test_threshold_calibration_hits_target_fraction_on_heldout():
    ds = topic_dataset(n=16000, n_models=2, n_topics=2, seed=3)
    tr, cal, te = ds.split(0.35, val_frac=0.35)
    r = build_router("threshold", epochs=3).fit(tr, featurizer=TfidfSvdFeaturizer(dim=16).fit(tr.require_texts()))
    # the topic feature alone makes the router's scores near-binary; calibrate across targets
    for target in (0.2, 0.5, 0.8):
        r.calibrate(cal, target)
        frac = (r.route_calibrated(te) == r.strong).mean()
        assert abs(frac - target) <= 0.02, (target, frac)


def test_bandit_regret_falls():
    ds = topic_dataset(n=1500, n_models=3, seed=4)
    r = build_router("bandit", epochs=6, batch=16).fit(ds, featurizer=TfidfSvdFeaturizer(dim=16).fit(ds.require_texts()))
    reg = np.array(r.regret_)
    q = len(reg) // 4
    assert reg[-q:].mean() < 0.7 * reg[:q].mean()


@pytest.mark.parametrize("name", ["oracle", "random", "best-single", "cheapest", *LEARNED])
def test_save_load_routes_identically(tmp_path, topics, name):
    tr, te, feat, xtr, xte = topics
    r = build_router(name, **FAST.get(name, {})).fit(tr, featurizer=feat)
    r.save(tmp_path / name)
    r2 = load_router(tmp_path / name)
    assert not list((tmp_path / name).glob("*.pkl"))
    for mu in (0.0, 0.3, 0.7):
        np.testing.assert_array_equal(r.route(te, tradeoff=mu), r2.route(te, tradeoff=mu))
    if not r.uses_truth:
        texts = ["please explain poetry", "algebra question"]
        np.testing.assert_array_equal(r.route(texts, tradeoff=0.2), r2.route(texts, tradeoff=0.2))


@pytest.mark.parametrize("name", TWO_MODEL)
def test_save_load_two_model(tmp_path, topics2, name):
    tr, te, feat, _, _ = topics2
    r = build_router(name, **FAST.get(name, {})).fit(tr, featurizer=feat)
    r.save(tmp_path / name)
    r2 = load_router(tmp_path / name)
    for mu in (0.1, 0.5, 0.9):
        np.testing.assert_array_equal(r.route(te, tradeoff=mu), r2.route(te, tradeoff=mu))
    np.testing.assert_array_equal(r.route_calibrated(te), r2.route_calibrated(te))


def test_budget_routing_meets_budget_and_rejects_too_small(topics):
    tr, te, feat, xtr, xte = topics
    r = build_router("carrot").fit(tr, featurizer=feat)
    _, c = r.estimate(te)
    for b in (0.0012, 0.002, 0.0028):
        idx = r.route(te, budget=b)
        assert r.paid_cost(idx, c).mean() <= b + 1e-12
    with pytest.raises(MoelabError, match="budget=.*below the cheapest"):
        r.route(te, budget=1e-6)


def test_universal_router_uses_an_unseen_model(topics):
    tr, te, feat, xtr, xte = topics
    seen = tr.select_models(["model1", "model2"])
    r = build_router("universal", n_clusters=6, n_probe=300).fit(seen, featurizer=feat)
    probe = [tr.prompt_ids.index(p) for p in r.probe_ids]
    j = tr.model_index("model0")
    r.add_model("model0", tr.scores_PM[probe, j], tr.costs_PM[probe, j])
    idx = r.route(te, tradeoff=0.0)
    names = np.array(r.models)[idx]
    algebra = np.array([c == "algebra" for c in te.categories])
    assert (names[algebra] == "model0").mean() > 0.8  # model0 is the specialist for topic 0
    with pytest.raises(MoelabError, match="one value per probe prompt"):
        r.add_model("x", np.zeros(3), np.zeros(3))


def test_text_router_needs_text():
    ds = topic_dataset(n=60, n_models=2, seed=5)
    ds.texts[3] = None
    with pytest.raises(MoelabError, match="no text.*prompt_id='s3'"):
        build_router("knn").fit(ds)


def test_two_model_router_rejects_three_models(topics):
    with pytest.raises(MoelabError, match="two models"):
        build_router("threshold").fit(topics[0])


def test_unknown_router_and_option():
    with pytest.raises(MoelabError, match="choose one of"):
        build_router("nope")
    with pytest.raises(MoelabError, match="unknown option"):
        build_router("knn", kk=3)


def test_oracle_picks_cheapest_best():
    s = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 0]], float)
    c = np.tile([3.0, 2.0, 1.0], (3, 1))
    ds = RoutingDataset("o", ["a", "b", "c"], ["x", "y", "z"], ["s"] * 3, ["c"] * 3, ["m0", "m1", "m2"], s, c)
    r = build_router("oracle").fit(ds)
    assert r.route(ds, tradeoff=0.0).tolist() == [1, 2, 2]

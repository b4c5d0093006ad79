"""The routers package: one file per router, the registry, old import paths, lazy torch."""

import subprocess
import sys
from pathlib import Path

import moelab.route.routers as R
from moelab.route import MODEL_ROUTERS

SRC = Path(__file__).resolve().parents[2] / "src"


def test_one_file_per_router_and_old_import_paths():
    files = {p.stem for p in (SRC / "moelab/route/routers").glob("*.py") if not p.stem.startswith("_")}
    mods = {e.obj.__module__.rsplit(".", 1)[1] for e in MODEL_ROUTERS.entries()}
    assert mods <= files and len(MODEL_ROUTERS) >= 15
    assert R.KNNRouter is MODEL_ROUTERS.get("knn") and R.MFRouter is MODEL_ROUTERS.get("mf")
    assert {r["name"] for r in R.router_info()} == set(MODEL_ROUTERS.names())


_PROBE = """
import sys, types
pkg = types.ModuleType("moelab"); pkg.__path__ = [{src!r} + "/moelab"]; sys.modules["moelab"] = pkg
from moelab.route.synthetic import topic_dataset
from moelab.route.base import build_router
ds = topic_dataset(n=120, n_models=3, seed=0)
for name in ("knn", "linear", "carrot"):
    r = build_router(name).fit(ds)
    r.route(["algebra question"], tradeoff=0.2)
print("torch" in sys.modules, "sklearn" in sys.modules)
"""


def test_routing_with_numpy_routers_never_imports_torch():
    # moelab/__init__ (the MoE core) is bypassed: this checks moelab.route's own imports
    out = subprocess.run([sys.executable, "-c", _PROBE.format(src=str(SRC))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "False"


def test_mf_numpy_routing_equals_the_torch_model():
    import torch

    from moelab.route import build_router
    from moelab.route.synthetic import topic_dataset

    ds = topic_dataset(n=200, n_models=3, seed=0)
    r = build_router("mf", epochs=2, dim=16).fit(ds)
    x = r.features(["algebra question", "poetry please"])
    with torch.no_grad():
        d_ref = r.net(torch.from_numpy(x)).numpy()  # RouteLLM's MFModel forward (the oracle)
    import numpy as np

    np.testing.assert_allclose(r.delta(x), d_ref, rtol=1e-4, atol=1e-5)
    p = r.win_prob(x)
    np.testing.assert_allclose(p[:, 0, 1], 1 / (1 + np.exp(-(d_ref[:, 0] - d_ref[:, 1]))), rtol=1e-5)

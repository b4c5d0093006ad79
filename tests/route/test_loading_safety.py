"""Unsafe loading (issue 13 §3): pickles run code, so moelab refuses them unless asked, and no
other code path in src/ may unpickle."""

import pickle
import re
from pathlib import Path

import pytest

from moelab.cli.main import main
from moelab.errors import MoelabError
from moelab.route import data as D

SRC = Path(__file__).resolve().parents[2] / "src" / "moelab"


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates a file, proving code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(tmp_path: Path, suffix=".pkl") -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    return path, marker


def test_the_crafted_pickle_really_runs_code(tmp_path):
    path, marker = _crafted(tmp_path)
    pickle.loads(path.read_bytes()).close()  # the oracle: plain unpickling runs the payload
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".dat"])
def test_pickle_is_refused_without_opt_in_and_runs_nothing(tmp_path, suffix):
    path, marker = _crafted(tmp_path, suffix)
    with pytest.raises(MoelabError, match="allow-pickle"):
        D.load_routerbench(path)
    with pytest.raises(MoelabError, match="allow-pickle"):
        D.load_dataset(str(path))
    assert not marker.exists()


def test_cli_refuses_pickle_and_opt_in_warns(tmp_path, capsys):
    path, marker = _crafted(tmp_path)
    assert main(["route", "compare", "--data", str(path), "--routers", "knn", "--no-cache"]) == 2
    assert "allow-pickle" in capsys.readouterr().err and not marker.exists()
    pytest.importorskip("pandas")
    with pytest.warns(UserWarning, match="runs any code"):
        with pytest.raises(Exception):  # the payload is no DataFrame; the point is the warning first
            main(["route", "compare", "--data", str(path), "--routers", "knn", "--no-cache", "--allow-pickle"])
    assert marker.exists()  # with the opt-in the file is unpickled (as the warning says)


# Any call that can unpickle (found by parsing, so docstrings and messages do not count):
# torch.load only with weights_only=True; np.load only with allow_pickle=False; pandas.read_pickle only
# inside data.read_pickle_checked (the opt-in gate); pickle/dill/joblib/shelve loads never.
_NEVER = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
          ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("shelve", "open")}


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _unpickling_calls(tree):
    import ast

    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for call in ast.walk(fn):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            base = call.func.value.id if isinstance(call.func.value, ast.Name) else ""
            attr = call.func.attr
            if (base, attr) in _NEVER:
                yield call.lineno, f"{base}.{attr}"
            elif base == "torch" and attr == "load":
                v = _kw(call, "weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    yield call.lineno, "torch.load without weights_only=True"
            elif base in ("np", "numpy") and attr == "load":
                v = _kw(call, "allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    yield call.lineno, "np.load without allow_pickle=False"
            elif attr == "read_pickle" and fn.name != "read_pickle_checked":
                yield call.lineno, "read_pickle outside the opt-in gate"


def test_nothing_else_in_src_unpickles():
    import ast

    bad = [f"{f.relative_to(SRC)}:{ln}: {what}" for f in sorted(SRC.rglob("*.py"))
           for ln, what in _unpickling_calls(ast.parse(f.read_text()))]
    assert not bad, "code that can unpickle:\n" + "\n".join(bad)
    gate = (SRC / "route" / "data.py").read_text()
    body = gate[gate.index("def read_pickle_checked"):gate.index("pd.read_pickle(path)")]
    assert "if not allow_pickle" in body and "warnings.warn" in body


def test_the_scanner_can_fail():
    import ast

    src = "def f(p):\n    import torch, pickle\n    torch.load(p)\n    pickle.loads(p)\n    np.load(p)\n"
    assert len(list(_unpickling_calls(ast.parse(src)))) == 3
    ok = "def f(p):\n    torch.load(p, weights_only=True)\n    np.load(p, allow_pickle=False)\n"
    assert not list(_unpickling_calls(ast.parse(ok)))

"""Checkpoints: round trip, checksums, atomic saving, keep-last, RNG states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.train import checkpoint as ckpt


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip(tmp_path):
    model, opt = model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"data": {"epoch": 1, "cursor": 3}})
    assert path.name == "step_000007"
    msd, osd, state = ckpt.read_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(msd[k], v)
    ref = opt.state_dict()
    for idx, st in ref["state"].items():
        for name, v in st.items():
            assert torch.equal(osd["state"][idx][name], v)
    assert osd["param_groups"] == ref["param_groups"]
    assert state["step"] == 7 and state["data"] == {"epoch": 1, "cursor": 3}
    # the restored optimizer continues exactly like the original
    m2, o2 = model_and_optimizer(seed=1)
    m2.load_state_dict(msd)
    o2.load_state_dict(osd)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (m2, o2)):
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state"])
def test_corrupted_checkpoint_refused(tmp_path, damage):
    model, opt = model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt)
    f = path / ckpt.MODEL_FILE
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete":
        f.unlink()
    else:
        (path / ckpt.STATE_FILE).write_text('{"step": 1, "sha')
    with pytest.raises(MoelabError, match="corrupted|incomplete"):
        ckpt.read_checkpoint(path)


def test_failure_while_saving_keeps_previous(tmp_path, monkeypatch):
    model, opt = model_and_optimizer()
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = {"n": 0}
    real = ckpt.save_file

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file, after the weights were written
            open(filename, "wb").write(b"partial")
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # no temp folder left behind
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    ckpt.read_checkpoint(good)  # still valid
    # a failure while re-saving the same step also keeps the old copy
    with pytest.raises(OSError):
        calls["n"] = 1
        ckpt.save_checkpoint(tmp_path, 1, model, opt)
    ckpt.read_checkpoint(good)


def test_keep_last(tmp_path):
    model, opt = model_and_optimizer()
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, model, opt, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    assert ckpt.find_checkpoint(tmp_path).name == "step_000040"
    with pytest.raises(MoelabError, match="30, 40"):
        ckpt.find_checkpoint(tmp_path, 10)

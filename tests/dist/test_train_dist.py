"""10 steps on 2 ranks (DP=2; DP=2 x EP=2) equal 1 process on the same global batch; save on 2, resume on 1."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from train_workers import dist_config, read_losses  # noqa: E402

from moelab.dist.launch import spawn  # noqa: E402
from moelab.dist.trainer import train_distributed  # noqa: E402
from moelab.train.trainer import train  # noqa: E402

WORKERS = str(Path(__file__).parent / "train_workers.py")
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def _close(a: list[dict], b: list[dict], steps=None) -> None:
    by_step = {r["step"]: r for r in b}
    assert [r["step"] for r in a] == (steps or [r["step"] for r in a])
    for r in a:
        for k in KEYS:
            assert r[k] == pytest.approx(by_step[r["step"]][k], rel=2e-5, abs=2e-6), (r["step"], k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ref = tmp / "ref"
    train(dist_config(tmp, 1), ref, progress="off")
    spawn(WORKERS, "train_runs", 2, (str(tmp), [
        {"name": "dp2ep2", "config": dist_config(tmp, 2, ckpt_every=5).to_dict()},
    ]), timeout_s=120)
    return tmp


@pytest.mark.slow
def test_dp2_equals_one_process(runs):
    # DP=2 x EP=2 (the default-run test) exercises DDP too; this is plain DP alone
    spawn(WORKERS, "train_runs", 2, (str(runs), [{"name": "dp2", "config": dist_config(runs, 1).to_dict()}]),
          timeout_s=120)
    ref = read_losses(runs / "ref")
    assert len(ref) == 10 and ref[0]["aux_loss"] > 0
    _close(read_losses(runs / "dp2"), ref, list(range(1, 11)))


def test_ep2_equals_one_process(runs):
    got = read_losses(runs / "dp2ep2")
    _close(got, read_losses(runs / "ref"), list(range(1, 11)))
    assert got[-1]["a2a_bytes_sent"] > 0


def test_distributed_run_exports_a_single_process_checkpoint(runs):
    from moelab.train.run import load_run

    run = load_run(runs / "dp2ep2")  # unsharded from the EP=2 DCP checkpoint
    assert run.step == 10
    assert run.model.blocks[0].ffn.experts.w_up_EFD.shape[0] == 4  # all experts again


def test_save_on_two_resume_on_one(runs, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(runs / "dp2ep2", run)
    shutil.rmtree(run / "dist_checkpoints" / "step_000010")
    cfg = dist_config(runs, 1)  # one process: ep=1; the checkpoint's expert shards are resharded
    train_distributed(cfg, run, resume=True, progress="off")
    resumed = read_losses(run)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    _close(resumed[5:], read_losses(runs / "dp2ep2")[5:], list(range(6, 11)))


@pytest.mark.slow
def test_dp2_unipool_shared_pool_equals_one_process(tmp_path):
    """UniPool's pool-level counts are summed over the ranks (the lagged pool loss of the next step)."""
    cfg = dist_config(tmp_path, 1, steps=6)
    cfg.model.layout.kind, cfg.model.layout.pool_fraction = "shared_pool", 1.0
    cfg.model.moe.aux_free_bias = False
    train(cfg, tmp_path / "ref", progress="off")
    spawn(WORKERS, "train_runs", 2, (str(tmp_path), [{"name": "dp2", "config": cfg.to_dict()}]), timeout_s=120)
    ref = read_losses(tmp_path / "ref")
    assert any(layer.get("pool_counts") for layer in ref[-1]["layers"])
    _close(read_losses(tmp_path / "dp2"), ref, list(range(1, 7)))

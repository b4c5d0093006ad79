"""Bad input: EP sizes, routers and layouts EP refuses (with the reason), checkpoints, a dying rank."""

import sys
from pathlib import Path

import pytest
import torch

from moelab.dist.checkpoint import check_resumable, load, save
from moelab.dist.ep import check_ep_supported
from moelab.dist.groups import ParallelState, check_parallel_sizes
from moelab.dist.launch import spawn
from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer

WORKERS = str(Path(__file__).parent / "ep_workers.py")


def _model(**moe_kw) -> MoETransformer:
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2, **moe_kw)
    return MoETransformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                                      d_ff_dense=16, moe=moe))


def test_ep_must_divide_world_and_experts():
    with pytest.raises(MoelabError, match=r"parallel.ep=3 does not divide the world size 4"):
        check_parallel_sizes(4, 0, 3, 12)
    with pytest.raises(MoelabError, match=r"parallel.ep=4 does not divide moe.num_experts=6"):
        check_parallel_sizes(4, 0, 4, 6)
    with pytest.raises(MoelabError, match=r"parallel.dp=3 is not valid with 4 processes"):
        check_parallel_sizes(4, 3, 1, 4)


@pytest.mark.parametrize("router, reason", [("smear", "merges the weights of all experts"),
                                            ("competesmoe", "every expert on every token"),
                                            ("erc", "every expert's input projection")])
def test_ep_refuses_routers_that_need_every_expert(router, reason):
    with pytest.raises(MoelabError, match=f"moe.router='{router}'.*{reason}"):
        check_ep_supported(_model(router=router), 2)
    check_ep_supported(_model(router=router), 1)  # data parallel is fine


def test_ep_accepts_sequence_and_cross_layer_routers():
    for router in ("expert_choice", "recurrent", "hash", "chain_of_experts"):
        check_ep_supported(_model(router=router), 2)


def test_ep_refuses_the_unipool_shared_pool():
    from moelab.layers.layouts import LayoutConfig

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, d_ff_dense=16,
                      moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2),
                      layout=LayoutConfig(kind="shared_pool", pool_fraction=1.0))
    with pytest.raises(MoelabError, match="layout.kind='shared_pool'.*one expert bank shared by several layers"):
        check_ep_supported(MoETransformer(cfg), 2)


def test_single_process_checkpoint_cannot_be_resharded(tmp_path):
    step = tmp_path / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    two = ParallelState(0, 2, 1, None, 10.0, "gloo")
    with pytest.raises(MoelabError, match="cannot be resharded to world=2"):
        check_resumable(tmp_path, two)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    one = ParallelState(0, 1, 1, None, 10.0, "gloo")
    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    path = save(tmp_path, 1, m, opt, one, {"data": {}})
    bigger = MoETransformer(ModelConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, d_ff_dense=16,
        moe=MoEConfig(d_model=16, d_ff=16, num_experts=8, k=2)))
    with pytest.raises(MoelabError, match="does not fit this model.*Size mismatch"):
        load(path, bigger, torch.optim.AdamW(bigger.parameters()), one)


def test_dying_rank_makes_the_other_fail_fast(tmp_path):
    out = tmp_path / "rank0.txt"
    spawn(WORKERS, "dying_peer", 2, (str(out),), timeout_s=10)
    elapsed, msg = out.read_text().splitlines()[:2]
    assert msg.startswith("PeerFailure: rank 0: collective 'test all-reduce' failed")
    assert "another rank probably died" in msg
    assert float(elapsed) < 15.0


def test_nproc_shorthand_builds_the_torchrun_command():
    from moelab.cli.dist import strip_nproc
    from moelab.dist.launch import torchrun_command

    argv = strip_nproc(["train", "--nproc", "2", "--parallel.ep", "2", "--nproc=3", "--run-dir", "r"])
    assert argv == ["train", "--parallel.ep", "2", "--run-dir", "r"]
    cmd = torchrun_command(2, argv)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["moelab", *argv]
    with pytest.raises(MoelabError, match="--nproc=0 is out of range"):
        torchrun_command(0, argv)


def test_parallel_config_keys_and_validation():
    from moelab.train.config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig(), ["--parallel.ep", "2", "parallel.timeout_s=30"])
    assert cfg.parallel.ep == 2 and cfg.parallel.timeout_s == 30.0 and cfg.parallel.active()
    assert RunConfig.from_dict(cfg.to_dict()).parallel.ep == 2
    cfg.parallel.backend = "mpi"
    with pytest.raises(MoelabError, match="parallel.backend"):
        cfg.parallel.validate()

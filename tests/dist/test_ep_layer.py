"""The MoE layer under EP=2 equals EP=1: outputs and every gradient, uneven loads, an empty expert."""

from pathlib import Path

import pytest

from moelab.dist.launch import spawn

WORKERS = str(Path(__file__).parent / "ep_workers.py")

CASES = [
    # softmax top-2, shared experts with a gate, switch aux loss (counts all-reduced), z-loss
    dict(d_ff=24, num_experts=4, k=2, num_shared_experts=1, shared_expert_gate=True, aux_loss="switch",
         aux_loss_coef=0.1, z_loss_coef=0.01, dispatch="grouped"),
    # sigmoid router, aux-free bias, global aux loss, GELU experts, sorted backend, 8 experts
    dict(d_ff=16, num_experts=8, k=3, router="sigmoid_topk", aux_free_bias=True, aux_loss="global",
         aux_loss_coef=0.05, activation="gelu", dispatch="sorted"),
]


def test_ep2_layer_equals_single_process():
    spawn(WORKERS, "layer_equivalence", 2, (CASES,), timeout_s=60)


@pytest.mark.slow
def test_ep2_layer_variable_k_routers():
    # capacity drops are decided per rank on its own tokens (as Megatron and GShard do), so a
    # capacity layer is not compared with one process on the global batch
    cases = [dict(d_ff=16, num_experts=4, k=2, router="top_p", hot=0.0),
             dict(d_ff=16, num_experts=4, k=2, router="null_experts", aux_loss="none", hot=0.0)]
    spawn(WORKERS, "layer_equivalence", 2, (cases,), timeout_s=60)

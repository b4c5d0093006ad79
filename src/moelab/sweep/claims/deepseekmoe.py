"""DeepSeekMoE (Dai et al. 2024): fine-grained + shared experts beat GShard top-2 at equal parameters."""

from moelab.sweep.reproduce import Claim, Condition, register

register(Claim(
    name="deepseekmoe",
    paper="Dai et al. 2024, DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models",
    statement="Fine-grained expert segmentation (m=2) with one shared expert isolated beats GShard-style top-2 "
              "routing at equal active and total expert parameters.",
    variants=[
        {"name": "gshard-top2", "moe.num_experts": 8, "moe.k": 2, "moe.d_ff": 256},
        # 15 routed experts of d_ff 128, top-3, + 1 shared of 128: active 3*128+128 = 2*256, total 16*128 = 8*256
        {"name": "fine-grained-shared", "moe.num_experts": 15, "moe.k": 3, "moe.d_ff": 128,
         "moe.num_shared_experts": 1, "moe.shared_d_ff": 128},
    ],
    conditions=[Condition("fine-grained-shared", "gshard-top2", "val_loss", "better", 0.01)],
))

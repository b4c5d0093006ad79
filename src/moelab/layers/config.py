"""Typed configuration of one MoE layer (a plain, serialisable dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(kw_only=True)
class MoEConfig:
    """Configuration of an MoE feed-forward layer: router -> balancing -> experts -> dispatch.

    Balance-loss normalisation: every balance loss in moelab equals 1.0 at perfect balance
    (Megatron's convention; Hugging Face's equals k). See ``moelab.layers.balancing``.
    """

    d_model: int = 256
    d_ff: int = 512  # hidden size of one routed expert
    num_experts: int = 8
    k: int = 2
    # router
    router: str = "softmax_topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    # balancing
    aux_loss: str = "switch"  # none | switch | sequence | global
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    aux_free_bias: bool = False  # DeepSeek-V3 auxiliary-loss-free bias balancing
    bias_update_rate: float = 1e-3
    # experts
    activation: str = "swiglu"  # swiglu | gelu
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # hidden size of each shared expert (default d_ff)
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert output
    init_std: float = 0.02
    # Multiplies the routed experts' combined output (not the shared experts'); 1.0 = off. Granular
    # upcycling (He et al. 2024, "Upcycling LLMs into MoE": weight scaling) and grown models set it
    # so the upcycled layer equals the dense FFN at step 0.
    routed_scale: float = 1.0
    # dispatch
    dispatch: str = "auto"  # auto | loop | sorted | grouped | capacity
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "probs"  # probs | position

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        return cls(**d)

    def fine_grained(self, m: int) -> "MoEConfig":
        """DeepSeekMoE fine-grained segmentation: m times more experts, each d_ff/m wide, k*m active."""
        from moelab.errors import MoelabError

        if m < 1 or self.d_ff % m:
            raise MoelabError(f"granularity m={m} must be >= 1 and divide d_ff={self.d_ff}")
        return replace(self, num_experts=self.num_experts * m, k=self.k * m, d_ff=self.d_ff // m)

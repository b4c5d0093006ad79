"""Typed configuration of the decoder-only MoE transformer (a plain, serialisable dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.layouts import LayoutConfig, plan_layout


@dataclass(kw_only=True)
class ModelConfig:
    """A LLaMA-style decoder whose feed-forward blocks are dense SwiGLU or MoE layers.

    Which blocks are MoE: ``moe_layers`` is ``"all"``, ``"none"``, an int ``n`` (every n-th
    block: blocks n-1, 2n-1, ...; ``1`` = all) or a list of block indices; then the first
    ``first_k_dense`` blocks are forced dense (DeepSeekMoE's dense first layers).
    ``moe.d_model`` is ignored: the MoE layers always get this config's ``d_model``
    (see :meth:`layer_moe_config`).

    How routed experts are laid out across depth (per-layer experts, a UniPool shared pool,
    ReXMoE reuse, DynaMoE expert-count schedules, shared routers): ``layout``
    (:class:`moelab.layers.layouts.LayoutConfig`; the default is vanilla per-layer MoE).
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    d_ff_dense: int = 512  # hidden size of the dense SwiGLU FFN blocks
    moe: MoEConfig = field(default_factory=MoEConfig)
    moe_layers: str | int | list[int] = "all"
    first_k_dense: int = 0
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Per-block MoE overrides: {"3": {"num_experts": 6}} gives block 3 its own MoEConfig fields
    # (pruned/merged/grown models, per-layer routers). Keys are block indices as strings (JSON).
    layer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Depth routing (moelab.models.depth; `moelab depth-route`): {"method": "drllm" | "router_tuning" | "duo",
    # ...method options}; empty: every block runs once. Routers' weights are in the checkpoint.
    depth: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_overrides = {str(k): dict(v) for k, v in (self.layer_overrides or {}).items()}

    # ------------------------------------------------------------------ helpers
    def moe_layer_indices(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE layer."""
        spec = self.moe_layers
        if spec == "all":
            idx = list(range(self.n_layers))
        elif spec == "none":
            idx = []
        elif isinstance(spec, int) and not isinstance(spec, bool):
            idx = [i for i in range(self.n_layers) if (i + 1) % spec == 0]
        elif isinstance(spec, list):
            idx = sorted(set(int(i) for i in spec))
        else:
            raise MoelabError(
                f"model.moe_layers={spec!r} is not valid; choose one of: 'all', 'none', "
                "an int n (every n-th layer), a list of layer indices"
            )
        return [i for i in idx if i >= self.first_k_dense]

    def layer_moe_config(self, index: int | None = None) -> MoEConfig:
        """The MoE config of block ``index`` (None: the shared base), ``d_model`` taken from the
        model and ``layer_overrides[str(index)]`` applied on top."""
        cfg = replace(self.moe, d_model=self.d_model)
        over = self.layer_overrides.get(str(index)) if index is not None else None
        return replace(cfg, **over) if over else cfg

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff_dense"):
            check_range(f"model.{name}", getattr(self, name), low=1)
        check_range("model.first_k_dense", self.first_k_dense, low=0)
        check_range("model.init_std", self.init_std, low=0.0, low_inclusive=False)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise MoelabError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} "
                "with an even head size (RoPE rotates pairs)"
            )
        spec = self.moe_layers
        if isinstance(spec, int) and not isinstance(spec, bool):
            check_range("model.moe_layers", spec, low=1)
        elif isinstance(spec, list):
            for i in spec:
                check_range("model.moe_layers[i]", int(i), low=0, high=self.n_layers - 1)
        self.moe_layer_indices()  # raises on an invalid spec
        if self.moe_layer_indices():
            check_range("moe.num_experts", self.moe.num_experts, low=1)
            check_range("moe.k", self.moe.k, low=1, high=self.moe.num_experts)
        plan_layout(self.layout, self.moe.num_experts, self.moe.k, self.moe_layer_indices())  # raises on a bad layout
        self._validate_overrides()
        return self

    def _validate_overrides(self) -> None:
        from dataclasses import fields

        valid = {f.name for f in fields(MoEConfig)} - {"d_model"}
        moe_idx = set(self.moe_layer_indices())
        for key, over in self.layer_overrides.items():
            if not str(key).isdigit() or int(key) not in moe_idx:
                raise MoelabError(f"model.layer_overrides key {key!r} is not an MoE block; MoE blocks: {sorted(moe_idx)}")
            bad = sorted(set(over) - valid)
            if bad:
                raise MoelabError(f"model.layer_overrides[{key!r}] has unknown fields {bad}; valid: {sorted(valid)}")
            if over and not self.layout.is_vanilla():
                raise MoelabError("model.layer_overrides needs the vanilla layout (model.layout.kind='per_layer')")
            c = self.layer_moe_config(int(key))
            check_range(f"model.layer_overrides[{key!r}].num_experts", c.num_experts, low=1)
            check_range(f"model.layer_overrides[{key!r}].k", c.k, low=1, high=c.num_experts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if isinstance(d.get("moe"), dict):
            d["moe"] = MoEConfig.from_dict(d["moe"])
        if isinstance(d.get("layout"), dict):
            d["layout"] = LayoutConfig.from_dict(d["layout"])
        return cls(**d)

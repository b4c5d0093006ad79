"""Which MoE layers of a model route causally, and refusing autoregressive use when one does not.

A router is causal when a token's routing never depends on later tokens of its sequence
(``Router.is_causal``, per mode: Sinkhorn, BASE and BIP couple the batch only in training;
expert-choice is causal in eval through its token-choice inference mode, unless
``eval_routing="expert_choice"``; SMEAR with ``merge="sequence"`` is never causal). Generation and
per-token evaluation of a non-causal router leak the future, so :func:`require_causal` refuses
them with an error naming the layers and routers.

Example (runs as is)::

    from moelab.models.config import ModelConfig
    from moelab.models.transformer import MoETransformer
    from moelab.models.causality import non_causal_layers

    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff_dense=64))
    print(non_causal_layers(model.eval()))   # [] : softmax top-k is causal
"""

from __future__ import annotations

from torch import nn

from moelab.errors import MoelabError
from moelab.models.moe_protocol import moe_layers


def router_is_causal(router: nn.Module, training: bool | None = None) -> bool:
    """``router.is_causal(training)`` when the router has it, else its ``causal`` attribute
    (True when absent); ``training=None`` asks for the router's current mode."""
    fn = getattr(router, "is_causal", None)
    return bool(fn(training)) if callable(fn) else bool(getattr(router, "causal", True))


def _router_name(router: nn.Module) -> str:
    cfg = getattr(router, "cfg", None) or getattr(getattr(router, "inner", None), "cfg", None)
    return getattr(cfg, "router", None) or type(router).__name__


def non_causal_layers(model: nn.Module, training: bool | None = None) -> list[str]:
    """``"block <i>: router '<name>' (<mode> mode)"`` for every MoE layer that is not causal in
    ``training`` mode (None: each router's current mode); empty when the model is causal."""
    out = []
    for site in moe_layers(model):
        router = getattr(site.layer, "router", None)
        if router is None or router_is_causal(router, training):
            continue
        mode = ("training" if router.training else "eval") if training is None else ("training" if training else "eval")
        out.append(f"block {site.index}: router {_router_name(router)!r} ({mode} mode)")
    return out


def require_causal(model: nn.Module, what: str, training: bool | None = None) -> None:
    """Raise MoelabError naming the non-causal MoE layers when ``what`` (e.g. "generate") would run
    a router whose decision depends on later tokens."""
    bad = non_causal_layers(model, training)
    if bad:
        raise MoelabError(
            f"{what} needs causal routing (a token's experts may not depend on later tokens), but these MoE "
            f"layers route non-causally: {'; '.join(bad)}. Use the router's causal inference mode (model.eval(); "
            "expert_choice: router_kwargs eval_routing='token_choice'; smear: merge='token') or a causal router"
        )

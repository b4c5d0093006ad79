"""moelab: routing in Mixture-of-Experts.

The MoE core is importable from here::

    import torch
    import moelab

    layer = moelab.MoELayer(moelab.MoEConfig(d_model=64, d_ff=128, num_experts=8, k=2))
    y = layer(torch.randn(4, 16, 64))     # balance losses ride on y's graph
    y.square().mean().backward()          # ... so the router is trained to balance too

Subpackages: ``moelab.layers`` (routers, balancing, experts, dispatch, layouts), ``moelab.models``,
``moelab.data``, ``moelab.train``, ``moelab.analysis``, ``moelab.sweep`` and ``moelab.route``
(model-level routing among LLMs).
"""

from moelab import _threads  # noqa: F401 -- first: OMP_WAIT_POLICY must be set before torch loads

__version__ = "0.1.0"

# Public names resolve lazily (moelab._lazy): `import moelab` does not import torch until a name is used.
from moelab._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "MoelabError": "moelab.errors",
    "AuxFreeBias": "moelab.layers.balancing",
    "balance_losses": "moelab.layers.balancing",
    "global_aux_value": "moelab.layers.balancing",
    "hf_to_moelab_coef": "moelab.layers.balancing",
    "install_aux_free_hook": "moelab.layers.balancing",
    "megatron_to_moelab_coef": "moelab.layers.balancing",
    "moelab_to_hf_coef": "moelab.layers.balancing",
    "sequence_aux_loss": "moelab.layers.balancing",
    "switch_aux_loss": "moelab.layers.balancing",
    "z_loss": "moelab.layers.balancing",
    "MoEConfig": "moelab.layers.config",
    "DISPATCHERS": "moelab.layers.dispatch",
    "apply_capacity": "moelab.layers.dispatch",
    "pick_dispatcher": "moelab.layers.dispatch",
    "ExpertBank": "moelab.layers.experts",
    "SharedExperts": "moelab.layers.experts",
    "MoELayer": "moelab.layers.moe",
    "ROUTERS": "moelab.layers.routers",
    "Router": "moelab.layers.routers",
    "build_router": "moelab.layers.routers",
    "RoutingContext": "moelab.layers.routing",
    "RoutingResult": "moelab.layers.routing",
    "routing_stats": "moelab.layers.stats",
}
_SUBPACKAGES = ("analysis", "data", "errors", "layers", "models", "registry", "route", "sweep", "train")
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, _SUBPACKAGES, globals())


__all__ = [
    "AuxFreeBias", "DISPATCHERS", "ExpertBank", "MoEConfig", "MoELayer", "MoelabError", "ROUTERS",
    "Router", "RoutingContext", "RoutingResult", "SharedExperts", "apply_capacity", "balance_losses",
    "build_router", "global_aux_value", "hf_to_moelab_coef", "install_aux_free_hook",
    "megatron_to_moelab_coef", "moelab_to_hf_coef", "pick_dispatcher", "routing_stats",
    "sequence_aux_loss", "switch_aux_loss", "z_loss", "__version__",
]

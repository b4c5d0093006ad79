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

from moelab.errors import MoelabError
from moelab.layers.balancing import (
    AuxFreeBias,
    balance_losses,
    global_aux_value,
    hf_to_moelab_coef,
    install_aux_free_hook,
    megatron_to_moelab_coef,
    moelab_to_hf_coef,
    sequence_aux_loss,
    switch_aux_loss,
    z_loss,
)
from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import DISPATCHERS, apply_capacity, pick_dispatcher
from moelab.layers.experts import ExpertBank, SharedExperts
from moelab.layers.moe import MoELayer
from moelab.layers.routers import ROUTERS, Router, build_router
from moelab.layers.routing import RoutingContext, RoutingResult
from moelab.layers.stats import routing_stats

__all__ = [
    "AuxFreeBias", "DISPATCHERS", "ExpertBank", "MoEConfig", "MoELayer", "MoelabError", "ROUTERS",
    "Router", "RoutingContext", "RoutingResult", "SharedExperts", "apply_capacity", "balance_losses",
    "build_router", "global_aux_value", "hf_to_moelab_coef", "install_aux_free_hook",
    "megatron_to_moelab_coef", "moelab_to_hf_coef", "pick_dispatcher", "routing_stats",
    "sequence_aux_loss", "switch_aux_loss", "z_loss", "__version__",
]

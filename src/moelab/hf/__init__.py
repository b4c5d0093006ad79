"""``moelab.hf``: Hugging Face models in and out, routing replay and router swap (issue 14).

Thin re-exports; the code lives in ``moelab.models.hf`` (import/export, imported run directories),
``moelab.models.replay`` and ``moelab.models.router_swap``. See docs/hf.md.
"""

from moelab.models.hf import (
    SUPPORTED, HFMoEModel, export_imported, export_moelab_model, export_run, from_pretrained, import_to_run,
    load_hf_run, save_hf_run,
)
from moelab.models.replay import RoutingRecording, record_routing, replay_routing
from moelab.models.router_swap import freeze_all_but_routers, swap_routers

__all__ = ["SUPPORTED", "HFMoEModel", "RoutingRecording", "export_imported", "export_moelab_model", "export_run",
           "freeze_all_but_routers", "from_pretrained", "import_to_run", "load_hf_run", "record_routing",
           "replay_routing", "save_hf_run", "swap_routers"]

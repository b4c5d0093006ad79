"""Model-level routing: choose which LLM answers each prompt.

Data (:mod:`.data`), prompt features (:mod:`.features`), routers behind one interface
(:mod:`.base`, :mod:`.routers`; names in ``MODEL_ROUTERS``), metrics (:mod:`.metrics`) and the
comparison/report pipeline (:mod:`.evaluate`). Independent of the in-model MoE layers.
"""

from moelab.route.base import MODEL_ROUTERS, ModelRouter, build_router, load_router
from moelab.route.data import (
    RoutingDataset,
    load_dataset,
    load_long,
    load_routellm_gsm8k,
    load_routellm_mmlu,
    load_routerarena,
    load_routerbench,
)
from moelab.route.features import LocalEmbeddingFeaturizer, TfidfSvdFeaturizer
from moelab.route import routers as _routers  # noqa: F401  (registers the routers)
from moelab.route.evaluate import compare, format_table, write_report

__all__ = [
    "MODEL_ROUTERS", "ModelRouter", "build_router", "load_router", "RoutingDataset", "load_dataset",
    "load_long", "load_routellm_gsm8k", "load_routellm_mmlu", "load_routerarena", "load_routerbench",
    "LocalEmbeddingFeaturizer", "TfidfSvdFeaturizer", "compare", "format_table", "write_report",
]

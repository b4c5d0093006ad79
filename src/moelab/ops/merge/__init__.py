"""Expert merging methods (one file each) behind ``MERGE_METHODS``; see :mod:`moelab.ops.merge.base`."""

from __future__ import annotations

import importlib
import pkgutil

from moelab.ops.merge.base import MERGE_METHODS, MergeConfig, align_permutation, merge_model, weighted_average

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MERGE_METHODS", "MergeConfig", "align_permutation", "merge_model", "weighted_average"]

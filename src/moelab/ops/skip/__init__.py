"""Expert skipping methods (one file each) behind ``SKIP_METHODS``; see :mod:`moelab.ops.skip.base`."""

from __future__ import annotations

import importlib
import pkgutil

from moelab.ops.skip.base import SKIP_METHODS, SkipConfig, frontier_search, install_skipping, realised_rate, skip_model

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["SKIP_METHODS", "SkipConfig", "frontier_search", "install_skipping", "realised_rate", "skip_model"]

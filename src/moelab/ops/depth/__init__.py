"""Routing across depth (issue 17 part 3): Dr.LLM, Router-Tuning (MindSkip), Duo-LLM, one file each, behind
``DEPTH_METHODS`` (``moelab.ops.depth.base``); the routers themselves live in ``moelab.models.depth``."""

from __future__ import annotations

import importlib

from moelab.ops.depth.base import DEPTH_METHODS, DepthConfig, Windows, make_windows

for _m in ("drllm", "router_tuning", "duo"):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["DEPTH_METHODS", "DepthConfig", "Windows", "make_windows"]

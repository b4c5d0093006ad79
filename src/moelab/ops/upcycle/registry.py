"""``UPCYCLERS``: upcycling recipes by name (``fn(model, cfg, **kw) -> model``, in place), and the typed
options dataclass of each (``UPCYCLE_CONFIGS``)."""

from __future__ import annotations

from typing import Any

from moelab.registry import Registry

UPCYCLERS: Registry[Any] = Registry("upcycle method")
UPCYCLE_CONFIGS: dict[str, type] = {}

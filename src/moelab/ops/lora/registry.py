"""``ADAPTERS``: LoRA adapters by name; each entry builds the adapted FFN,
``build(base_ffn, cfg: AdapterConfig, *, index, n_blocks) -> nn.Module``."""

from __future__ import annotations

from typing import Any

from moelab.registry import Registry

ADAPTERS: Registry[Any] = Registry("adapter")

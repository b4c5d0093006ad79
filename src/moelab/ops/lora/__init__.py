"""LoRA adapters and mixtures of LoRA experts on a frozen dense model.

One file per adapter, registered in ``ADAPTERS``: ``lora`` (Hu et al. 2021), ``mixlora`` (Li et al. 2024),
``smora`` (Zhao et al. 2025), ``comol``, ``dynmole`` (Li et al. 2025), ``mola`` (Gao et al. 2024); all read
:class:`AdapterConfig`. :func:`add_adapters`, :func:`save_adapters`, :func:`load_adapters`,
:func:`merge_lora` in :mod:`moelab.ops.lora.apply`; the fine-tuning loop in :mod:`moelab.ops.lora.finetune`.
"""

from __future__ import annotations

import importlib
import pkgutil

from moelab.ops.lora.base import AdapterConfig
from moelab.ops.lora.registry import ADAPTERS

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_") and _m.name not in ("registry", "finetune"):
        importlib.import_module(f"{__name__}.{_m.name}")

from moelab.ops.lora.apply import add_adapters, load_adapters, merge_lora, save_adapters  # noqa: E402

__all__ = ["ADAPTERS", "AdapterConfig", "add_adapters", "load_adapters", "merge_lora", "save_adapters"]

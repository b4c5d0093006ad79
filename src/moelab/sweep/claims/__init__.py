"""The registry of seed-paper claims that ``moelab reproduce`` runs (one file per claim).

Each module defines one :class:`moelab.sweep.reproduce.Claim` and registers it in :data:`CLAIMS`
with ``@register``; importing this package imports every module of the folder.
"""

from __future__ import annotations

import importlib
import pkgutil

from moelab.sweep.reproduce import CLAIMS, register  # noqa: F401  (re-exported)

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

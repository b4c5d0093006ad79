"""Thread settings that degrade gracefully on shared cores; run by ``moelab/__init__.py`` first.

By default the OpenMP runtime of PyTorch's CPU wheels (GNU libgomp) lets idle worker threads
spin-wait for a while before sleeping. On an idle machine that saves a wake-up per parallel region;
on cores shared with other work the spinning threads steal the cores that the busy thread needs
(measured in issue 13 on 2 shared cores: about 400 tokens/s with two spinning threads against
1,000 with one passive thread; see benchmarks/threads.py). ``OMP_WAIT_POLICY=PASSIVE`` makes idle
threads sleep at once.

The knob: moelab sets ``OMP_WAIT_POLICY=PASSIVE`` only when the user has not set
``OMP_WAIT_POLICY`` themselves, and only when ``MOELAB_OMP_WAIT_POLICY`` is unset or "passive";
``MOELAB_OMP_WAIT_POLICY=default`` leaves the OpenMP runtime's own default. The runtime reads the
variable once, when torch loads its OpenMP library, so this works only if moelab is imported before
torch (``import moelab`` first, or the ``moelab`` command); :data:`APPLIED` records what happened.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

KNOB = "MOELAB_OMP_WAIT_POLICY"
CHOICES = ("passive", "default")


def configure(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``env`` unless the user chose otherwise; return what was set."""
    choice = env.get(KNOB, "passive").strip().lower()
    if choice not in CHOICES:
        sys.stderr.write(f"moelab: warning: {KNOB}={env[KNOB]!r} is not valid; choose one of: "
                         f"{', '.join(map(repr, CHOICES))} (using 'passive')\n")
        choice = "passive"
    if choice == "default" or "OMP_WAIT_POLICY" in env:
        return None
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


TORCH_LOADED_FIRST = "torch" in sys.modules  # True: too late, the OpenMP runtime may have read the env
APPLIED = configure()

"""Training progress: a tqdm bar (ETA, live loss, tokens/s) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``update(step, loss=..., tokens_per_s=...)`` once per step; ``write(msg)`` for messages.

    ``mode``: "bar" (tqdm), "log" (a line every ``log_every`` steps, and the last), "off", or
    "auto" = bar if ``stream`` is a terminal else log.
    """

    def __init__(self, total: int, initial: int = 0, *, mode: str = "auto", log_every: int = 10,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.total, self.log_every = mode, total, max(1, log_every)
        self.start_step, self.t0 = initial, time.perf_counter()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True,
                             desc="train", unit="step")

    def update(self, step: int, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
        elif self.mode == "log" and (step % self.log_every == 0 or step == self.total):
            done = step - self.start_step
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            parts = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            print(f"step {step}/{self.total} {parts} elapsed={elapsed:.0f}s eta={eta:.0f}s",
                  file=self.stream, flush=True)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        elif self.mode != "off":
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)

"""Progress across a whole sweep: runs done, the running runs' steps, elapsed time and ETA.

On a terminal ("bar") one status line is redrawn in place; otherwise ("log") a line is printed
when a run starts or ends and every ``log_every_s`` seconds. The ETA divides the steps still to
train (over all unfinished runs) by the step rate of one worker so far in this session (steps per
worker-second) times the workers that can still run at once (``min(jobs, unfinished runs)``), so
it adapts to ``--jobs``, to slower routers and to the last runs of a sweep running alone.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _hms(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class SweepProgress:
    def __init__(self, plan: Any, *, mode: str = "auto", stream: TextIO | None = None,
                 log_every_s: float = 30.0, jobs: int = 1) -> None:
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode, self.log_every_s = mode, log_every_s
        self.n_runs = len(plan.runs)
        self.steps_of = {r.name: r.steps for r in plan.runs}
        self.done_step = {r.name: (r.steps if r.state == "done" else r.step) for r in plan.runs}
        self.start_step = dict(self.done_step)
        self.n_done = sum(r.state == "done" for r in plan.runs)
        self.t0 = time.perf_counter()
        self.jobs = max(1, jobs)
        self.worker_s = 0.0  # sum over workers of the time they have been training
        self._last_update = self.t0
        self._last_log = 0.0
        self._line_len = 0

    # -- numbers
    def steps_trained(self) -> int:
        return sum(max(0, self.done_step[n] - self.start_step[n]) for n in self.done_step)

    def steps_left(self) -> int:
        return sum(max(0, self.steps_of[n] - self.done_step[n]) for n in self.done_step)

    def eta_s(self) -> float | None:
        trained = self.steps_trained()
        if trained <= 0 or self.worker_s <= 0:
            return None
        unfinished = sum(self.done_step[n] < self.steps_of[n] for n in self.done_step)
        return self.steps_left() / (trained / self.worker_s) / max(1, min(self.jobs, unfinished))

    def status(self, running: list[tuple[Any, int]]) -> str:
        cur = "; ".join(f"{r.name} {step}/{r.steps}" for r, step in running) or "-"
        return (f"[sweep] {self.n_done}/{self.n_runs} runs done | running: {cur} | "
                f"elapsed {_hms(time.perf_counter() - self.t0)} | ETA {_hms(self.eta_s())}")

    # -- events
    def started(self, run: Any) -> None:
        verb = "resuming" if run.state == "partial" else "starting"
        self.message(f"[sweep] {verb} {run.name} ({self.n_done}/{self.n_runs} done)"
                     + (f" from step {run.step}" if run.state == "partial" else ""))

    def finished(self, run: Any, *, ok: bool, why: str = "") -> None:
        if ok:
            self.n_done += 1
            self.done_step[run.name] = run.steps
        self.message(f"[sweep] {'finished' if ok else 'stopped'} {run.name}" + (f": {why}" if why else "")
                     + f" ({self.n_done}/{self.n_runs} done, ETA {_hms(self.eta_s())})")

    def update(self, running: list[tuple[Any, int]]) -> None:
        now = time.perf_counter()
        self.worker_s += (now - self._last_update) * len(running)
        self._last_update = now
        for r, step in running:
            self.done_step[r.name] = max(self.done_step[r.name], step) if step >= self.start_step[r.name] else step
        if self.mode == "bar":
            line = self.status(running)
            width = 160
            line = line[:width]
            self.stream.write("\r" + line + " " * max(0, self._line_len - len(line)))
            self.stream.flush()
            self._line_len = len(line)
        elif self.mode == "log" and running:
            now = time.perf_counter()
            if now - self._last_log >= self.log_every_s:
                self._last_log = now
                print(self.status(running), file=self.stream, flush=True)

    def message(self, msg: str) -> None:
        if self.mode == "off":
            return
        if self.mode == "bar" and self._line_len:
            self.stream.write("\r" + " " * self._line_len + "\r")
            self._line_len = 0
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.mode == "bar" and self._line_len:
            self.stream.write("\n")
            self.stream.flush()
            self._line_len = 0

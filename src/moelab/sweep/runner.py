"""Running a sweep: plan (validate every run, check fairness) first, then train run after run.

Layout of a sweep directory::

    SWEEP_DIR/sweep.json            the spec, the fairness report and every run (config keys, parameters)
    SWEEP_DIR/configs/<run>.json    the full RunConfig of each run (what its worker trains)
    SWEEP_DIR/runs/<run>/           an ordinary run directory (docs/INTERFACES.md, "run directory")
    SWEEP_DIR/logs/<run>.log        the worker's output (log lines, tracebacks)
    SWEEP_DIR/logs/<run>.pid        the process id of the worker training <run> (while it runs)
    SWEEP_DIR/leaderboard.{md,html} written by :func:`moelab.sweep.leaderboard.write_leaderboard`

Every run is trained by its own worker process (``python -m moelab.sweep.worker``), ``jobs`` at a
time. A run whose ``summary.json`` says it finished is skipped; a run with a ``config.json`` but no
finished summary is resumed from its newest checkpoint (the trainer's exact resume), so a sweep
killed at any point continues where it stopped when started again, and never retrains a finished
run. Ctrl-C (SIGINT) or SIGTERM to the sweep asks every worker to finish its current step, save a
checkpoint and stop; a worker stopped from outside makes the sweep start no further runs.

Before anything trains, :func:`plan_sweep` builds every run's config (unknown keys, bad values and
unknown router names fail here, naming the run and the key), builds each model once to count its
total and active parameters (which also checks ``router_kwargs``), and checks fairness
(:mod:`moelab.sweep.fairness`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from moelab.errors import MoelabError
from moelab.sweep.fairness import FairnessReport, check_fairness
from moelab.sweep.spec import RunSpec, SweepSpec

SWEEP_FILE, CONFIGS_DIR, RUNS_DIR, LOGS_DIR = "sweep.json", "configs", "runs", "logs"
EXIT_INTERRUPTED = 3


@dataclass
class PlannedRun:
    """One run of a sweep: its spec, full config, directory, parameter counts and state."""

    spec: RunSpec
    config: Any  # moelab.train.config.RunConfig
    run_dir: Path
    params_total: int
    params_active: int
    state: str = "new"  # "new" | "partial" (resume) | "done"
    step: int = 0  # last logged step (partial runs)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def group(self) -> str:
        return self.spec.group

    @property
    def steps(self) -> int:
        return self.config.train.steps

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent.parent / LOGS_DIR / f"{self.name}.log"

    @property
    def lock_path(self) -> Path:
        return self.run_dir.parent.parent / LOGS_DIR / f"{self.name}.pid"


@dataclass
class SweepPlan:
    spec: SweepSpec
    sweep_dir: Path
    runs: list[PlannedRun]
    fairness: FairnessReport

    def counts(self) -> dict[str, int]:
        out = {"new": 0, "partial": 0, "done": 0}
        for r in self.runs:
            out[r.state] += 1
        return out

    def describe(self) -> str:
        """A table of the runs: group, seed, state, total and active parameters, steps, tokens."""
        c = self.counts()
        lines = [f"sweep {self.spec.name!r}: {len(self.runs)} runs ({c['done']} finished, {c['partial']} to resume, "
                 f"{c['new']} to start) in {self.sweep_dir}",
                 f"{'run':<48} {'state':<8} {'total params':>13} {'active params':>13} {'steps':>6}"]
        for r in self.runs:
            state = f"{r.state}@{r.step}" if r.state == "partial" else r.state
            lines.append(f"{r.name:<48} {state:<8} {r.params_total:>13,} {r.params_active:>13,} {r.steps:>6}")
        lines.append(self.fairness.describe())
        return "\n".join(lines)


@dataclass
class SweepResult:
    plan: SweepPlan
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already finished before this call
    failed: dict[str, str] = field(default_factory=dict)  # run name -> reason (see its train.log)
    interrupted: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


# --------------------------------------------------------------------------- planning


def build_run_config(spec: SweepSpec, run: RunSpec):
    """The RunConfig of ``run``: the spec's preset, then its dotted overrides; validated."""
    from moelab.train.config import set_key
    from moelab.train.presets import PRESETS, preset

    if spec.preset not in PRESETS:
        raise MoelabError(f"sweep {spec.name!r}: preset={spec.preset!r} is not valid; choose one of: "
                          f"{', '.join(map(repr, sorted(PRESETS)))}")
    cfg = preset(spec.preset)
    for key, value in run.overrides.items():
        try:
            set_key(cfg, key, value)
        except MoelabError as e:
            raise MoelabError(f"sweep {spec.name!r}, run {run.name!r}, key {key!r}: {e}") from None
    try:
        cfg.validate()
    except MoelabError as e:
        raise MoelabError(f"sweep {spec.name!r}, run {run.name!r}: {e}") from None
    return cfg


def count_parameters(cfg) -> tuple[int, int]:
    """(total, active per token) of ``cfg.model``, by building it (this also checks router_kwargs).

    The vocabulary is the config's ``model.vocab_size`` (the trainer later sets the tokenizer's,
    identical for every run of a fair sweep, so differences between runs are exact).
    """
    import torch

    from moelab.models.transformer import MoETransformer

    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = MoETransformer(cfg.model)
        except MoelabError:
            raise
        except Exception:  # noqa: BLE001 -- a router that cannot be built on "meta": build it for real
            model = MoETransformer(cfg.model)
    n = model.num_parameters()
    return int(n["total"]), int(n["active"])


def _expected_config_dict(cfg) -> dict[str, Any]:
    d = cfg.to_dict()
    d["model"].pop("vocab_size", None)  # the trainer sets it from the tokenizer
    return d


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config with the defaults of keys added to RunConfig since it was written (a run
    trained before ``model.depth`` existed has no such key, and its value is the default); a config
    that no longer parses is compared as it is (and then differs)."""
    from moelab.train.config import RunConfig

    try:
        return RunConfig.from_dict(saved).to_dict()
    except Exception:  # noqa: BLE001 - the comparison reports the difference
        return saved


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run_state(run_dir: Path) -> tuple[str, int]:
    """("done" | "partial" | "new", last step) of a run directory."""
    from moelab.train.trainer import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

    summary = _read_json(run_dir / SUMMARY_FILE)
    if summary and not summary.get("interrupted") and summary.get("step") is not None \
            and summary.get("steps") is not None and summary["step"] >= summary["steps"] \
            and summary.get("val_loss") is not None:
        return "done", int(summary["step"])
    if (run_dir / CONFIG_FILE).is_file():
        return "partial", last_step(run_dir / METRICS_FILE)
    return "new", 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def last_step(metrics_path: Path) -> int:
    """The ``step`` of the last complete line of a metrics.jsonl (0 if none); reads only the tail."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return 0
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return 0


def plan_sweep(spec: SweepSpec, sweep_dir: str | Path, *, allow_unfair: bool | None = None) -> SweepPlan:
    """Validate every run of ``spec`` and check fairness, before anything trains.

    Raises MoelabError on an unknown key, a bad value, an unknown router, a run directory whose
    saved config differs from the spec's (the spec changed: use a new sweep directory), or an
    unfair sweep (unless ``allow_unfair`` or the spec's ``fairness.allow_unfair``).
    """
    sweep_dir = Path(sweep_dir)
    from moelab.train.trainer import CONFIG_FILE

    runs: list[PlannedRun] = []
    counted: dict[str, tuple[int, int]] = {}
    for rs in spec.expand():
        cfg = build_run_config(spec, rs)
        if rs.group not in counted:  # seeds do not change the architecture
            try:
                counted[rs.group] = count_parameters(cfg)
            except MoelabError as e:
                raise MoelabError(f"sweep {spec.name!r}, run {rs.name!r}: {e}") from None
        total, active = counted[rs.group]
        run_dir = sweep_dir / RUNS_DIR / rs.name
        state, step = run_state(run_dir)
        if state != "new":
            saved = _with_defaults(_read_json(run_dir / CONFIG_FILE) or {})
            saved.get("model", {}).pop("vocab_size", None)
            diff = _diff_keys(_expected_config_dict(cfg), saved)
            if diff:
                raise MoelabError(
                    f"run {rs.name!r} in {str(run_dir)!r} was trained with a different config "
                    f"(keys {', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''} differ from the spec); "
                    "the spec changed since: use a new sweep directory, or delete that run directory")
        runs.append(PlannedRun(rs, cfg, run_dir, total, active, state, step))
    tolerance = float(spec.fairness_setting("active_param_tolerance"))
    if allow_unfair is None:
        allow_unfair = bool(spec.fairness_setting("allow_unfair"))
    report = check_fairness(
        [(r.name, r.group, r.config.to_dict(), r.params_active) for r in runs], tolerance=tolerance)
    if not report.fair and not allow_unfair:
        raise MoelabError(report.refusal())
    return SweepPlan(spec, sweep_dir, runs, report)


def write_plan(plan: SweepPlan) -> None:
    """Write sweep.json and configs/<run>.json (idempotent)."""
    (plan.sweep_dir / CONFIGS_DIR).mkdir(parents=True, exist_ok=True)
    (plan.sweep_dir / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    for r in plan.runs:
        _write_if_changed(plan.sweep_dir / CONFIGS_DIR / f"{r.name}.json", json.dumps(r.config.to_dict(), indent=2) + "\n")
    doc = {"spec": plan.spec.to_dict(), "fairness": plan.fairness.to_dict(),
           "runs": [{"name": r.name, "group": r.group, "seed": r.spec.seed, "overrides": r.spec.overrides,
                     "params_total": r.params_total, "params_active": r.params_active, "steps": r.steps}
                    for r in plan.runs]}
    _write_if_changed(plan.sweep_dir / SWEEP_FILE, json.dumps(doc, indent=2, default=str) + "\n")


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- running


def _pid_alive_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return b"moelab.sweep.worker" in cmdline


def _check_not_running(r: PlannedRun) -> None:
    lock = r.lock_path
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        return
    if pid != os.getpid() and _pid_alive_worker(pid):
        raise MoelabError(f"run {r.name!r} is being trained by process {pid} (an earlier sweep still running?); "
                          "wait for it or stop it first")


@dataclass
class _Active:
    run: PlannedRun
    proc: subprocess.Popen
    log: TextIO
    start_step: int


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, *, jobs: int = 1, allow_unfair: bool | None = None,
              progress: str = "auto", fail_fast: bool = False, stream: TextIO | None = None,
              poll_s: float = 0.5, python: str | None = None, env: dict[str, str] | None = None) -> SweepResult:
    """Plan (validate + fairness), then train every unfinished run; returns a :class:`SweepResult`.

    ``jobs``: runs trained at once (one worker process each; on a CPU give each ``train.threads``).
    ``progress``: "auto" (one updating line on a terminal, log lines otherwise), "bar", "log", "off".
    A failed run does not stop the others unless ``fail_fast``; its reason and log are in the result.
    """
    from moelab.errors import check_range
    from moelab.sweep.progress import SweepProgress

    check_range("jobs", jobs, low=1)
    t0 = time.perf_counter()
    sweep_dir = Path(sweep_dir)
    plan = plan_sweep(spec, sweep_dir, allow_unfair=allow_unfair)
    write_plan(plan)
    result = SweepResult(plan)
    todo = [r for r in plan.runs if r.state != "done"]
    result.skipped = [r.name for r in plan.runs if r.state == "done"]
    for r in todo:
        _check_not_running(r)
    bar = SweepProgress(plan, mode=progress, stream=stream, jobs=jobs)
    bar.message(plan.describe())
    if todo:
        _warm_data_cache(todo[0].config, bar)
    pending = list(todo)
    active: list[_Active] = []
    restore_term = _raise_on_sigterm()
    worker_env = {**os.environ, **(env or {})}
    if jobs > 1 and "OMP_NUM_THREADS" not in worker_env:  # share the cores instead of oversubscribing them
        worker_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    try:
        while pending or active:
            while pending and len(active) < jobs and not (fail_fast and result.failed):
                r = pending.pop(0)
                active.append(_launch(r, plan.sweep_dir, python or sys.executable, worker_env,
                                      reference=_crn_reference(spec, plan, r)))
                bar.started(r)
            for a in list(active):
                rc = a.proc.poll()
                if rc is None:
                    continue
                active.remove(a)
                a.log.close()
                state, step = run_state(a.run.run_dir)
                if rc == 0 and state == "done":
                    result.finished.append(a.run.name)
                    bar.finished(a.run, ok=True)
                elif rc == EXIT_INTERRUPTED:  # someone stopped the worker: start nothing new
                    result.interrupted = True
                    pending.clear()
                    bar.finished(a.run, ok=False, why=f"interrupted at step {step}")
                else:
                    why = f"exit code {rc}; see {a.run.log_path}"
                    result.failed[a.run.name] = why
                    bar.finished(a.run, ok=False, why=why)
            if fail_fast and result.failed:
                pending.clear()
            bar.update([(a.run, last_step(a.run.run_dir / "metrics.jsonl")) for a in active])
            if active:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        result.interrupted = True
        bar.message("sweep interrupted: asking the running workers to save a checkpoint ...")
        for a in active:
            if a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        for a in active:
            try:
                a.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                a.proc.kill()
            a.log.close()
        bar.message("run the same command again to continue the sweep")
    finally:
        restore_term()
        bar.close()
    result.wall_s = time.perf_counter() - t0
    if result.failed:
        bar.message("failed runs:\n" + "\n".join(f"  {n}: {w}" for n, w in result.failed.items()))
    return result


def _raise_on_sigterm():
    """SIGTERM to the sweep = Ctrl-C (stop the workers gracefully); returns the restorer."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _warm_data_cache(cfg, bar) -> None:
    """Prepare (tokenise) the shared data once, so parallel workers do not race to build the cache."""
    from moelab.data.pipeline import prepare_data

    bar.message("preparing the data (corpus + tokenizer; cached after the first time) ...")
    prepare_data(cfg.data)


def _crn_reference(spec: SweepSpec, plan: SweepPlan, r: PlannedRun) -> Path | None:
    """The config file of the first configuration's run with ``r``'s seed (common random numbers)."""
    if not spec.common_init:
        return None
    first = plan.runs[0].group
    return plan.sweep_dir / CONFIGS_DIR / f"{first}__seed{r.spec.seed}.json"


def _launch(r: PlannedRun, sweep_dir: Path, python: str, env: dict[str, str], reference: Path | None = None) -> _Active:
    r.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(r.log_path, "a", encoding="utf-8")
    log.write(f"--- sweep worker started {time.strftime('%Y-%m-%d %H:%M:%S')} (state {r.state}, step {r.step})\n")
    log.flush()
    cmd = [python, "-m", "moelab.sweep.worker", str(sweep_dir / CONFIGS_DIR / f"{r.name}.json"), str(r.run_dir),
           str(r.lock_path)] + (["--crn-reference", str(reference)] if reference is not None else [])
    # own session: a Ctrl-C on the terminal reaches only the sweep, which forwards one SIGTERM
    # (= one graceful stop) to each worker
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    return _Active(r, proc, log, r.step)

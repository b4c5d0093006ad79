"""Per-window evaluation records for runs that predate them.

A run trained before ``eval_windows.json`` existed has only its aggregate val loss, so the
leaderboard cannot give the evaluation noise of its comparisons. :func:`backfill` re-evaluates such a
run's final checkpoint exactly as the trainer evaluated it (same windows, batch size and batch cap)
and writes the record, after checking that the windows add up to the val loss the run reported: a
record that does not reproduce the reported number is refused, never written.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelab.errors import MoelabError

WINDOWS_FILE = "eval_windows.json"


def needs_backfill(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and not (run_dir / WINDOWS_FILE).is_file() and \
        json.loads(summary.read_text()).get("eval_step") is not None


def backfill_run(run_dir: str | Path, *, rel_tol: float = 1e-5) -> dict:
    """Re-evaluate ``run_dir``'s evaluated checkpoint with per-window records; returns the record."""
    import torch

    from moelab.data.pipeline import prepare_data
    from moelab.train.run import load_run
    from moelab.train.trainer import _write, evaluate

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["eval_step"]
    run = load_run(run_dir, step)
    cfg = run.config
    data = prepare_data(cfg.data, tokenizer=run.tokenizer if cfg.data.tokenizer == "pretrained" else None)
    with torch.inference_mode():
        res = evaluate(run.model, data.tokens["val"], run.tokenizer, data.splits.domains, seq_len=cfg.data.seq_len,
                       batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                       max_batches=cfg.train.eval_max_batches, dtype=cfg.train.dtype,
                       cache_dir=cfg.data.cache_dir, windows=True)
    if abs(res["val_loss"] - summary["val_loss"]) > rel_tol * abs(summary["val_loss"]):
        raise MoelabError(f"run {str(run_dir)!r}: re-evaluating step {step} gives val_loss {res['val_loss']:.6f}, "
                          f"not the {summary['val_loss']:.6f} it reported; no per-window record written")
    record = {"step": step, "nll": res["window_nll"], "tokens": res["window_tokens"], "backfilled": True}
    _write(run_dir / WINDOWS_FILE, record)
    return record


def backfill(sweep_dir: str | Path, *, write=print) -> int:
    """Backfill every finished run of ``sweep_dir`` that lacks a per-window record; returns how many."""
    todo = [p for p in sorted((Path(sweep_dir) / "runs").glob("*")) if needs_backfill(p)]
    for i, run_dir in enumerate(todo, 1):
        write(f"[windows] re-evaluating {run_dir.name} ({i}/{len(todo)}) for its per-window losses")
        backfill_run(run_dir)
    return len(todo)

"""One run of a sweep in its own process:
``python -m moelab.sweep.worker CONFIG.json RUN_DIR [PID_FILE] [--crn-reference REF_CONFIG.json]``.

With ``--crn-reference`` a run that starts at step 0 first copies the shared weights of the
reference configuration (common random numbers, :mod:`moelab.sweep.crn`).

Starts the run, or resumes it from its newest checkpoint when ``RUN_DIR/config.json`` exists (the
trainer's exact resume; a run killed before its first checkpoint restarts from step 0; a directory
left without a config by a crash is replaced). SIGTERM is turned into the trainer's first Ctrl-C:
it finishes the current step, saves a checkpoint and returns (a second SIGTERM stops at once,
saving the last completed step). ``PID_FILE`` holds this process's id while it
runs (so a second sweep does not train the same run at the same time).
Exit status: 0 finished, 3 interrupted (resumable), 1 error (the traceback is printed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

EXIT_INTERRUPTED = 3


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    reference = None
    if "--crn-reference" in argv:
        i = argv.index("--crn-reference")
        reference = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i:i + 2]
    if len(argv) not in (2, 3) or ("--crn-reference" in sys.argv[1:] and reference is None):
        print("usage: python -m moelab.sweep.worker CONFIG.json RUN_DIR [PID_FILE] [--crn-reference REF.json]",
              file=sys.stderr)
        return 2
    config_path, run_dir = Path(argv[0]), Path(argv[1])
    lock = Path(argv[2]) if len(argv) == 3 else None

    def on_term(signum, frame):  # SIGTERM = the trainer's first Ctrl-C: stop after this step, save
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, on_term)
    if lock is not None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(os.getpid()))
    try:
        from moelab.train.config import RunConfig
        from moelab.train.trainer import CONFIG_FILE, train

        cfg = RunConfig.from_dict(json.loads(config_path.read_text()))
        resume = (run_dir / CONFIG_FILE).is_file()
        hook = None
        if reference is not None:
            from moelab.sweep.crn import make_init_hook

            hook = make_init_hook(reference)
        summary = train(cfg, run_dir, resume=resume, overwrite=not resume, progress="log", init_hook=hook)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 -- the parent reports the failure; the traceback goes to the log
        traceback.print_exc()
        return 1
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
        sys.stdout.flush()
    return EXIT_INTERRUPTED if summary.get("interrupted") or summary.get("step", 0) < cfg.train.steps else 0


if __name__ == "__main__":
    sys.exit(main())

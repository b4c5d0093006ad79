"""Every compression method x budget on one trained run -> benchmarks/results/compress_compare.{md,json}.

    python benchmarks/compress_compare.py /work/runs/tiny2000            # full: all methods, 0.75/0.5/0.25
    python benchmarks/compress_compare.py RUN --quick                    # 3 methods, 1 budget, tiny eval

Wraps ``moelab.ops.compare.compress_compare`` (the ``moelab compress-compare`` command) and records the
settings and the machine with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from common import RESULTS_DIR

from moelab.ops.calibrate import CalibrationConfig
from moelab.ops.compare import DEFAULT_METHODS, compress_compare, markdown_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--quick", action="store_true", help="reap, hc_smoe, modes at keep 0.5; 1 eval batch per domain")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches per domain (batch 16)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--out", default=None, help="where the comparison's own files go (default RUN/compress)")
    args = ap.parse_args()
    methods = "reap,hc_smoe,modes" if args.quick else DEFAULT_METHODS
    keeps = [0.5] if args.quick else [0.75, 0.5, 0.25]
    eb = 1 if args.quick else args.eval_batches
    t0 = time.time()
    res = compress_compare(args.run_dir, methods.split(","), keeps, args.out or os.path.join(args.run_dir, "compress"),
                           ccfg=CalibrationConfig(tokens=args.calib_tokens), eval_batches=eb, eval_batch_size=16)
    wall = time.time() - t0
    head = (f"# compress-compare: {args.run_dir} (step {res['step']})\n\n"
            f"Settings: methods {methods}; keep {keeps}; calibration {res['calibration_tokens']} tokens "
            f"(seeded, domain-balanced, train split); validation {eb} batches x 16 x seq_len per domain. "
            f"Wall time {wall:.0f} s on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
            f"shared with other jobs: under load).\n\n")
    name = "compress_compare_quick" if args.quick else "compress_compare"
    (RESULTS_DIR / f"{name}.md").write_text(head + markdown_table(res))
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(head + markdown_table(res))


if __name__ == "__main__":
    main()

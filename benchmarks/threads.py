"""Training throughput on idle and on shared cores: OpenMP's default wait policy vs PASSIVE.

What is measured: tokens/s of a training step (forward, backward, AdamW) of the ``tiny`` preset's
model, in a fresh process per measurement (the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when
torch loads), for

* policy ``default`` (``MOELAB_OMP_WAIT_POLICY=default``: the runtime's own spin-then-sleep) and
  ``passive`` (moelab's setting, ``OMP_WAIT_POLICY=PASSIVE``),
* intra-op threads: all cores and 1,
* load: ``idle`` and ``busy`` (``--busy`` competing processes spinning a core each while measuring).

Interleaved: every round measures every (load, policy, threads) once, the order of policies and
threads rotated each round, so drift on a shared machine hits every case alike; medians over rounds.

    python benchmarks/threads.py [--rounds 3] [--steps 20] [--busy 1]
    python benchmarks/threads.py --quick        # 1 round, 3 steps, small batch, all-core threads only

Writes benchmarks/results/threads.json and threads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
POLICIES = {"default": {"MOELAB_OMP_WAIT_POLICY": "default"}, "passive": {}}


def worker(steps: int, warmup: int, batch: int, threads: int) -> None:
    """One measurement in this process (moelab first, so its thread settings apply before torch)."""
    sys.path.insert(0, str(SRC))
    import moelab._threads as moelab_threads  # noqa: F401 -- must precede torch
    import torch

    from moelab.models.transformer import MoETransformer
    from moelab.train.presets import preset

    torch.set_num_threads(threads)
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids_BL = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
    labels_BL = torch.roll(ids_BL, -1, dims=1)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        model(ids_BL, labels_BL=labels_BL).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"tokens_per_s": ids_BL.numel() / statistics.median(times), "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "torch_loaded_first": moelab_threads.TORCH_LOADED_FIRST}))


def measure(policy: str, threads: int, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MOELAB_OMP_WAIT_POLICY",
                                                           "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(POLICIES[policy])
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def run(args: argparse.Namespace) -> dict:
    ncpu = os.cpu_count() or 1
    thread_counts = [ncpu] if args.quick or ncpu == 1 else [ncpu, 1]
    cases = [(p, t) for p in POLICIES for t in thread_counts]
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for load in ("idle", "busy"):
            busy = start_busy(args.busy) if load == "busy" else []
            try:
                time.sleep(0.5 if busy else 0)
                for i in range(len(cases)):
                    policy, threads = cases[(i + r) % len(cases)]
                    res = measure(policy, threads, args)
                    results.setdefault(f"{load}/{policy}/{threads}", []).append(res)
                    print(f"round {r + 1}/{args.rounds} {load:4s} {policy:7s} threads={threads}: "
                          f"{res['tokens_per_s']:,.0f} tokens/s", flush=True)
            finally:
                stop_busy(busy)
    return {"cases": {k: {"tokens_per_s_median": statistics.median(x["tokens_per_s"] for x in v),
                          "tokens_per_s": [x["tokens_per_s"] for x in v], "omp_wait_policy": v[0]["omp_wait_policy"],
                          "threads": v[0]["threads"]} for k, v in results.items()},
            "thread_counts": thread_counts}


def markdown(payload: dict) -> str:
    c, info = payload["cases"], payload["machine"]
    lines = [f"# Training throughput, OpenMP wait policy, idle vs shared cores\n",
             f"tiny preset model, batch {payload['args']['batch']} x 128 tokens, median of {payload['args']['rounds']} "
             f"interleaved rounds x {payload['args']['steps']} steps; busy = {payload['args']['busy']} spinning "
             f"process(es). {info['cpu_count']} cores, torch {info['torch']}, load average at start "
             f"{info['load_avg_1m']:.2f}{' (quick run: indicative only)' if payload['args']['quick'] else ''}.\n",
             "| policy | threads | idle tokens/s | busy tokens/s | busy / idle |", "|---|---:|---:|---:|---:|"]
    for policy in POLICIES:
        for t in payload["thread_counts"]:
            idle, busy = (c[f"{load}/{policy}/{t}"]["tokens_per_s_median"] for load in ("idle", "busy"))
            lines.append(f"| {policy} | {t} | {idle:,.0f} | {busy:,.0f} | {busy / idle:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (the tiny preset's 16)")
    ap.add_argument("--busy", type=int, default=1, help="competing spinning processes in the busy case")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 round, 3 steps, batch 4, all-core threads only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.steps, args.warmup, args.batch, args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 1, 3, 1, 4
    sys.path.insert(0, str(HERE))
    from common import machine_info, write_results

    payload = {"machine": machine_info(), "args": vars(args), **run(args)}
    md = markdown(payload)
    write_results("threads", payload, md)
    print(md)


if __name__ == "__main__":
    main()

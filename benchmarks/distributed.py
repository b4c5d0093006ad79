"""Distributed training steps on CPU (gloo): 1 process vs DP=2 vs DP=2 x EP=2, same global batch.

Model: the ``tiny`` preset's MoETransformer (random init, random token ids). Each case runs
``--steps`` timed optimizer steps (after ``--warmup``) of forward + backward + gradient sync
(+ expert-gradient sums, global-norm clipping) + AdamW, on a global batch of ``--batch`` sequences of
``--seq`` tokens. Reported per case: tokens/s of the global batch (median step time over ranks' max),
forward all-to-all bytes per step summed over ranks (measured by the EP dispatcher; the backward moves
as much again) against the bytes-per-token model (``moelab.dist.comm_model``) evaluated with the
measured mean experts per token, the forward collective seconds measured inside the dispatcher, and
the fraction of step time in communication, estimated as ``1 - t(1 process on one rank's shard) /
t(parallel step)`` (DDP's all-reduce overlaps the backward, so it cannot be timed in isolation).

    python benchmarks/distributed.py [--quick] [--steps 10] [--batch 16] [--seq 128]

Writes benchmarks/results/distributed.json and .md. On a shared 2-core machine the parallel cases
compete with each other for cores: numbers are about correctness of the plumbing, not speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_results  # noqa: E402

from moelab.dist.balance import install_dp_balance, install_step_reduction  # noqa: E402
from moelab.dist.comm_model import bytes_per_token  # noqa: E402
from moelab.dist.data_parallel import clip_grad_norm, sync_expert_grads, wrap_data_parallel  # noqa: E402
from moelab.dist.ep import COMM, install_ep  # noqa: E402
from moelab.dist.groups import ParallelState, init_parallel  # noqa: E402
from moelab.dist.launch import spawn  # noqa: E402
from moelab.layers.balancing import install_aux_free_hook  # noqa: E402
from moelab.models.transformer import MoETransformer  # noqa: E402
from moelab.train.presets import preset  # noqa: E402
from moelab.train.trainer import build_optimizer  # noqa: E402


def _steps(state: ParallelState, ep: int, batch: int, seq: int, steps: int, warmup: int, rows: int) -> dict:
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    install_ep(model, state)
    install_dp_balance(model, state)
    opt = build_optimizer(model, cfg.train)
    install_step_reduction(opt, model, state)
    install_aux_free_hook(opt, model)
    ddp = wrap_data_parallel(model, state)
    g = torch.Generator().manual_seed(1)
    times, a2a, comm, kbar = [], [], [], []
    for i in range(warmup + steps):
        ids = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=g)
        local = ids[state.rank * rows:(state.rank + 1) * rows]
        COMM.reset()
        t0 = time.perf_counter()
        out = ddp(local[:, :-1], labels_BL=local[:, 1:])
        out.loss.backward()
        sync_expert_grads(model, state)
        clip_grad_norm(model, 1.0, state)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            a2a.append(COMM.bytes_sent)
            comm.append(COMM.comm_seconds)
            kbar.append(statistics.mean(layer.last_stats["experts_per_token"] for _, layer in model.moe_layers()))
    return {"times": times, "a2a_bytes": a2a, "comm_s": comm, "kbar": kbar,
            "d_model": cfg.model.d_model, "moe_layers": len(list(model.moe_layers()))}


def worker(rank: int, world: int, ep: int, batch: int, seq: int, steps: int, warmup: int, out_dir: str) -> None:
    state = init_parallel(ep)
    res = _steps(state, ep, batch, seq, steps, warmup, batch // world)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


def single(batch: int, seq: int, steps: int, warmup: int, rows: int) -> dict:
    return _steps(ParallelState(0, 1, 1, None, 60.0, "gloo"), 1, batch, seq, steps, warmup, rows)


def parallel_case(ep: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        spawn(__file__, "worker", 2, (ep, args.batch, args.seq, args.steps, args.warmup, d), timeout_s=300,
              threads=args.threads)
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(2)]


def row(name: str, per_rank: list[dict], args, shard_time: float) -> dict:
    step_t = statistics.median(max(ts) for ts in zip(*(r["times"] for r in per_rank)))
    tokens = args.batch * args.seq
    a2a = statistics.median(sum(b) for b in zip(*(r["a2a_bytes"] for r in per_rank)))
    kbar = statistics.mean(statistics.mean(r["kbar"]) for r in per_rank)
    r0 = per_rank[0]
    world = len(per_rank)
    model_bytes = (bytes_per_token(kbar, r0["d_model"], "float32", world) * tokens * r0["moe_layers"]
                   if name.startswith("ep") else 0.0)
    return {"case": name, "ranks": world, "step_ms": 1e3 * step_t, "tokens_per_s": tokens / step_t,
            "a2a_fwd_bytes_per_step": a2a, "a2a_model_bytes_per_step": model_bytes,
            "fwd_collective_ms": 1e3 * statistics.median(max(c) for c in zip(*(r["comm_s"] for r in per_rank))),
            "comm_fraction_est": max(0.0, 1.0 - shard_time / step_t) if world > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps of a small batch (checks the plumbing)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.seq = 3, 1, 4, 32
    torch.set_num_threads(args.threads)
    one = single(args.batch, args.seq, args.steps, args.warmup, args.batch)
    shard = statistics.median(single(args.batch, args.seq, args.steps, args.warmup, args.batch // 2)["times"])
    rows = [row("1 process", [one], args, 0.0), row("dp2", parallel_case(1, args), args, shard),
            row("ep2 (dp2 x ep2)", parallel_case(2, args), args, shard)]
    cols = ["case", "ranks", "step_ms", "tokens_per_s", "a2a_fwd_bytes_per_step", "a2a_model_bytes_per_step",
            "fwd_collective_ms", "comm_fraction_est"]
    md = (f"# Distributed training step (gloo, CPU){' --quick' if args.quick else ''}\n\n"
          f"global batch {args.batch} x {args.seq} tokens, tiny preset, {args.steps} timed steps\n\n"
          + markdown_table(rows, cols))
    pj, pm = write_results("distributed" + ("_quick" if args.quick else ""), {"machine": machine_info(), "args": vars(args),
                                                                          "rows": rows}, md)
    print(md)
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()

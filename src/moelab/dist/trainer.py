"""The distributed training loop: the single-process loop of ``moelab.train.trainer`` on N ranks.

One optimizer step on ``world`` ranks equals one step of the single-process trainer on the same
global batch: every rank draws the same ``train.batch_size`` rows from the same stream and keeps rows
``[rank*b, (rank+1)*b)`` (b = batch/world); the model is built from the same seed on every rank and
then sharded (EP); gradients are the global-batch mean (DDP + :mod:`moelab.dist.data_parallel`);
balancing statistics are global (:mod:`moelab.dist.balance`). Logged losses are means over ranks.

Only rank 0 writes the run directory (config, metrics, eval, summary); every rank takes part in
checkpoints (DCP, :mod:`moelab.dist.checkpoint`) and evaluation (EP layers need every rank). The
per-layer routing stats in metrics.jsonl are rank 0's (its shard of the batch).

Stochastic routers (``noisy_topk``'s noise, random choices) draw from each rank's RNG, seeded alike:
their draws differ from one process's, so only deterministic routers reproduce the 1-process losses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moelab.data.loader import Batch, TrainStream
from moelab.data.pipeline import prepare_data
from moelab.dist import checkpoint as dckpt
from moelab.dist.balance import install_dp_balance, install_step_reduction
from moelab.dist.data_parallel import clip_grad_norm, sync_expert_grads, wrap_data_parallel
from moelab.dist.ep import COMM, install_ep
from moelab.dist.groups import ParallelState, all_reduce_sum, guarded, init_parallel
from moelab.errors import MoelabError
from moelab.layers.balancing import install_aux_free_hook
from moelab.models.transformer import MoETransformer
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.train.metrics import JsonlLog, jsonable, truncate_after
from moelab.train.progress import Progress
from moelab.train.trainer import (CONFIG_FILE, EVAL_FILE, MANIFEST_FILE, METRICS_FILE, SUMMARY_FILE,
                                  TOKENIZER_FILE, _dumps, _summary, build_optimizer, evaluate, lr_at,
                                  prepare_run_dir)


def local_rows(batch: Batch, state: ParallelState) -> Batch:
    """This rank's rows of a global batch."""
    b = batch.input_ids_BL.shape[0] // state.world
    sl = slice(state.rank * b, (state.rank + 1) * b)
    return Batch(batch.input_ids_BL[sl], batch.labels_BL[sl], batch.valid_BL[sl], batch.domain_B[sl])


def rank_device(state: ParallelState) -> torch.device:
    """``cuda:LOCAL_RANK`` with NCCL, else the CPU."""
    import os

    if state.backend != "nccl":
        return torch.device("cpu")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    torch.cuda.set_device(dev)
    return dev


def build_parallel_model(cfg: RunConfig, state: ParallelState) -> torch.nn.Module:
    """The single-process model (same seed), then EP-sharded and with DP balancing."""
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model).to(rank_device(state))
    install_ep(model, state)
    install_dp_balance(model, state)
    for _, layer in model.moe_layers():
        layer.aux_loss_scale = 1.0 / cfg.train.grad_accum
    return model


def _barrier(state: ParallelState, what: str) -> None:
    if state.world > 1:
        with guarded(what):
            dist.barrier()


def _prepare(cfg: RunConfig, run_dir: Path, state: ParallelState, resume: bool, overwrite: bool):
    if cfg.train.batch_size % state.world:
        raise MoelabError(f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible by the "
                          f"world size {state.world}; choose a multiple of {state.world}")
    if state.rank == 0:
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        data = prepare_data(cfg.data)
    _barrier(state, "data preparation")
    if state.rank != 0:
        data = prepare_data(cfg.data)  # from rank 0's cache
    cfg.model.vocab_size = data.tokenizer.vocab_size
    if state.rank == 0:
        data.tokenizer.save(run_dir / TOKENIZER_FILE)
        (run_dir / MANIFEST_FILE).write_text(_dumps(data.manifest))
        cfg.save(run_dir / CONFIG_FILE)
    return data


def _mean_over_ranks(values: list[float], state: ParallelState) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum(t, state.dp_group, "loss logging")
    return (t / state.world).tolist()


def train_distributed(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                      progress: str = "auto", until_step: int | None = None,
                      state: ParallelState | None = None) -> dict[str, Any]:
    """Train ``cfg`` on every process of the torchrun job (``cfg.parallel``); return the summary."""
    run_dir = Path(run_dir)
    cfg.validate()
    pc, tcfg = cfg.parallel, cfg.train
    state = state or init_parallel(pc.ep, dp=pc.dp, timeout_s=pc.timeout_s, backend=pc.backend,
                                   num_experts=cfg.model.moe.num_experts)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if resume:
        dckpt.check_resumable(run_dir, state)
    data = _prepare(cfg, run_dir, state, resume, overwrite)
    model = build_parallel_model(cfg, state)
    optimizer = build_optimizer(model, tcfg)
    install_step_reduction(optimizer, model, state)
    install_aux_free_hook(optimizer, model)
    stream = TrainStream(data.tokens["train"], data.tokenizer, cfg.data.seq_len, tcfg.batch_size, cfg.data.seed,
                         domains=data.splits.domains)
    step, tokens_seen = 0, 0
    found = dckpt.list_dist_checkpoints(run_dir) if resume else []
    if found:
        meta = dckpt.load(found[-1][1], model, optimizer, state)
        stream.load_state_dict(meta["data"])
        ckpt.set_rng_state(meta["rng"])
        step, tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
    if resume and state.rank == 0:
        for name in (METRICS_FILE, EVAL_FILE):
            truncate_after(run_dir / name, step)
    ddp = wrap_data_parallel(model, state)
    return _loop(cfg, run_dir, state, model, ddp, optimizer, stream, data, step, tokens_seen, until_step, progress)


def _train_step(cfg: RunConfig, state: ParallelState, model, ddp, optimizer, stream) -> dict[str, Any]:
    tcfg = cfg.train
    sums = [0.0, 0.0, 0.0]
    n_tokens = 0
    COMM.reset()
    for _ in range(tcfg.grad_accum):
        batch = stream.next_batch()
        n_tokens += batch.n_valid
        local = local_rows(batch, state).to(next(model.parameters()).device)
        out = ddp(local.input_ids_BL, labels_BL=local.labels_BL, valid_BL=local.valid_BL)
        with guarded("backward (DDP gradient all-reduce / EP all-to-all)"):
            (out.loss / tcfg.grad_accum).backward()
        for i, v in enumerate((out.loss.detach(), out.lm_loss.detach(), out.aux_loss)):
            sums[i] += float(v)
    sync_expert_grads(model, state)
    grad_norm = clip_grad_norm(model, tcfg.grad_clip, state) if tcfg.grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss, lm, aux = _mean_over_ranks([s / tcfg.grad_accum for s in sums], state)
    return {"loss": loss, "lm_loss": lm, "aux_loss": aux, "grad_norm": grad_norm, "n_tokens": n_tokens,
            "a2a_bytes": COMM.bytes_sent, "a2a_s": COMM.seconds}


def _export(cfg: RunConfig, run_dir: Path, step: int) -> None:
    """The final DCP checkpoint, unsharded, as a single-process checkpoint (rank 0; RNG preserved)."""
    rng = ckpt.rng_state()
    full = build_parallel_model(cfg, ParallelState(0, 1, 1, None, 60.0, "gloo"))
    opt = build_optimizer(full, cfg.train)
    extra = {"lr": lr_at(max(step, 1), cfg.train), "exported_from": "dist_checkpoints"}
    dckpt.export_single_process(run_dir, step, full, opt, extra, keep_last=cfg.train.keep_last)
    ckpt.set_rng_state(rng)


def _loop(cfg, run_dir, state, model, ddp, optimizer, stream, data, step, tokens_seen, until_step, progress):
    tcfg = cfg.train
    rank0 = state.rank == 0
    last = until_step if until_step is not None else tcfg.steps
    with torch.device("meta"):  # the unsharded model's counts (this rank holds E/ep experts per layer)
        params = MoETransformer(cfg.model).num_parameters()
    metrics = JsonlLog(run_dir / METRICS_FILE) if rank0 else None
    evals = JsonlLog(run_dir / EVAL_FILE) if rank0 else None
    bar = Progress(tcfg.steps, step, mode=progress if rank0 else "off", log_every=tcfg.log_every)
    bar.write(f"moelab: training on {state.world} ranks (dp={state.world}, ep={state.ep}, {state.backend}), "
              f"steps {step}..{last} -> {run_dir}")
    recent: list[dict] = []
    session_tokens, session_time, last_eval = 0, 0.0, None

    def save() -> None:
        extra = {"data": stream.state_dict(), "tokens_seen": tokens_seen, "rng": ckpt.rng_state()}
        dckpt.save(run_dir, step, model, optimizer, state, extra, keep_last=tcfg.keep_last)

    def run_eval() -> dict:
        res = evaluate(model, data.tokens["val"], data.tokenizer, data.splits.domains, seq_len=cfg.data.seq_len,
                       batch_size=tcfg.eval_batch_size or tcfg.batch_size, max_batches=tcfg.eval_max_batches,
                       device=next(model.parameters()).device, cache_dir=cfg.data.cache_dir)
        res = {"step": step, **res}
        if rank0:
            evals.write(res)
        return res

    model.train()
    try:
        while step < last:
            t0 = time.perf_counter()
            lr = lr_at(step + 1, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            r = _train_step(cfg, state, model, ddp, optimizer, stream)
            step += 1
            tokens_seen += r["n_tokens"]
            dt = time.perf_counter() - t0
            session_tokens, session_time = session_tokens + r["n_tokens"], session_time + dt
            record = {"step": step, "loss": r["loss"], "lm_loss": r["lm_loss"], "aux_loss": r["aux_loss"], "lr": lr,
                      "grad_norm": r["grad_norm"], "tokens_per_s": r["n_tokens"] / dt, "tokens": tokens_seen,
                      "a2a_bytes_sent": r["a2a_bytes"], "a2a_s": r["a2a_s"],
                      "layers": [{"layer": i, **jsonable(layer.last_stats or {})} for i, layer in model.moe_layers()]}
            recent = (recent + [record])[-50:]
            if rank0:
                metrics.write(record)
            bar.update(step, loss=record["loss"], tok_s=record["tokens_per_s"], lr=lr)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                last_eval = run_eval()
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < last:
                save()
        if step > 0:
            save()
            if rank0:
                _export(cfg, run_dir, step)
            _barrier(state, "single-process export")
        if step >= tcfg.steps:
            last_eval = run_eval()
    finally:
        if rank0:
            metrics.close()
            evals.close()
        bar.close()
    summary = _summary(run_dir, cfg, step, params, last_eval, recent, session_tokens, session_time, False)
    summary.update(world=state.world, ep=state.ep)
    if rank0:
        (run_dir / SUMMARY_FILE).write_text(_dumps(summary))
    return summary

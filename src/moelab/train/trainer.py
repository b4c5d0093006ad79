"""The training loop: one readable function, :func:`train`, plus :func:`evaluate`.

One optimizer step = ``grad_accum`` micro-batches of forward + backward, gradient clipping, the
learning rate of the step (linear warmup, then cosine decay to ``min_lr_ratio * lr``; Loshchilov &
Hutter 2017, "SGDR"), an AdamW step (Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization"; decay on matrices only). The aux-loss-free bias of every MoE layer is updated once
per optimizer step by the step pre-hook of ``install_aux_free_hook``; every MoE layer's
``aux_loss_scale`` is ``1/grad_accum`` because the balance losses reach the gradient through the
layers' outputs, not through the ``loss / grad_accum`` we backpropagate.

Determinism: the model is initialised from ``train.seed``; the data order is a function of
``data.seed`` and the stream position; checkpoints hold weights, optimizer state, RNG states and the
stream position, so a resumed run repeats the losses of an uninterrupted one.

Ctrl-C: the first SIGINT asks the loop to stop after the current step; it then saves a checkpoint
and returns (``summary["interrupted"]``). A KeyboardInterrupt raised elsewhere also saves the last
completed step before returning.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moelab.data.loader import TrainStream, eval_batches
from moelab.data.pipeline import prepare_data
from moelab.data.tokenizer import Tokenizer
from moelab.errors import MoelabError
from moelab.models.transformer import MoETransformer
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.train.metrics import JsonlLog, jsonable, read_jsonl, truncate_after
from moelab.train.progress import Progress

CONFIG_FILE, MANIFEST_FILE, TOKENIZER_FILE = "config.json", "data_manifest.json", "tokenizer.json"
METRICS_FILE, EVAL_FILE, SUMMARY_FILE, CKPT_DIR = "metrics.jsonl", "eval.jsonl", "summary.json", "checkpoints"


# --------------------------------------------------------------------------- pieces


def lr_at(step: int, tcfg) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to min_lr_ratio*lr."""
    if tcfg.warmup_steps and step <= tcfg.warmup_steps:
        return tcfg.lr * step / tcfg.warmup_steps
    progress = min(1.0, (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps))
    min_lr = tcfg.lr * tcfg.min_lr_ratio
    return min_lr + 0.5 * (tcfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters with >= 2 dims (matrices, expert banks, embeddings) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MoelabError("train.device='cuda' is not valid here: no CUDA device; choose one of: 'auto', 'cpu'")
    return torch.device(name)


def autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing run directory unless ``resume`` or ``overwrite``."""
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise MoelabError(f"run_dir={str(run_dir)!r} is not a run directory (no {CONFIG_FILE}); nothing to resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise MoelabError(
                f"run_dir={str(run_dir)!r} already exists and is not empty; pass --resume to continue it "
                "or --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, docs, tokenizer: Tokenizer, domains: list[str], *, seq_len: int,
             batch_size: int, max_batches: int | None = None, device: torch.device | str = "cpu",
             dtype: str = "float32", cache_dir: str | None = None) -> dict[str, Any]:
    """Token-weighted validation loss and perplexity, overall and per domain.

    Returns ``{"val_loss", "val_ppl", "tokens", "per_domain": {domain: {"loss", "ppl", "tokens"}}}``;
    ``max_batches`` caps the batches per domain.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    nll = defaultdict(float)
    count = defaultdict(int)
    try:
        for batch in eval_batches(docs, tokenizer, seq_len, batch_size, domains, max_batches=max_batches,
                                  cache_dir=cache_dir):
            batch = batch.to(device)
            with autocast(device, dtype):
                logits_BLV = model(batch.input_ids_BL).logits
            nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), batch.labels_BL, ignore_index=-100,
                                     reduction="none")
            for di in batch.domain_B.unique().tolist():
                rows = batch.domain_B == di
                nll[di] += float(nll_BL[rows].sum())
                count[di] += int(batch.valid_BL[rows].sum())
    finally:
        model.train(was_training)
    per_domain = {}
    for di, n in sorted(count.items()):
        if n:
            loss = nll[di] / n
            per_domain[domains[di]] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}
    total = sum(count.values())
    loss = sum(nll.values()) / total if total else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)) if total else float("nan"),
            "tokens": total, "per_domain": per_domain}


def _stop_on_sigint() -> tuple[dict[str, bool], Callable[[], None]]:
    """Install a SIGINT handler that sets a flag (first Ctrl-C) or raises (second)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    signal.signal(signal.SIGINT, handler)
    return flag, lambda: signal.signal(signal.SIGINT, previous)


def load_init_weights(model: torch.nn.Module, init_from: Path, tokenizer: Tokenizer, run_dir: Path) -> None:
    """Load ``init_from``'s newest weights into ``model`` (same tokenizer required); note it in
    ``run_dir/init_from.json``."""
    saved = init_from / TOKENIZER_FILE
    if not saved.is_file() or Tokenizer.load(saved).fingerprint != tokenizer.fingerprint:
        raise MoelabError(f"init_from={str(init_from)!r} has no {TOKENIZER_FILE} or a different tokenizer than "
                          "this run's data; use the same data config")
    path = ckpt.find_checkpoint(init_from / CKPT_DIR)
    model_sd, _, state = ckpt.read_checkpoint(path, with_optimizer=False)
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as e:
        raise MoelabError(f"init_from={str(init_from)!r}: its weights do not fit model config ({e})") from None
    (run_dir / "init_from.json").write_text(_dumps({"run": str(init_from), "step": int(state["step"])}))


# --------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: str = "auto", until_step: int | None = None, init_from: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (layout: docs/INTERFACES.md, "run directory"); return the summary.

    ``resume`` continues from the newest checkpoint (its config is ``cfg``: pass the saved one, with
    any overrides). ``overwrite`` replaces an existing run directory. ``progress``: "auto", "bar",
    "log" or "off". ``until_step`` stops early (with a checkpoint) after that step, the schedule
    still following ``train.steps`` (for time-sliced jobs and tests). ``init_from`` (a run directory)
    starts from that run's newest weights with a fresh optimizer and schedule (a continued run, as OLMoE
    advises for upcycled models); ``cfg.model`` must describe those weights.
    """
    run_dir = Path(run_dir)
    cfg.validate()
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tcfg = cfg.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = pick_device(tcfg.device)

    # ---- data and tokenizer
    data = prepare_data(cfg.data)
    tokenizer = data.tokenizer
    if resume and (run_dir / TOKENIZER_FILE).is_file():
        saved = Tokenizer.load(run_dir / TOKENIZER_FILE)
        if saved.fingerprint != tokenizer.fingerprint:
            raise MoelabError(f"the data of run_dir={str(run_dir)!r} changed (tokenizer differs); cannot resume exactly")
    tokenizer.save(run_dir / TOKENIZER_FILE)
    (run_dir / MANIFEST_FILE).write_text(_dumps(data.manifest))
    cfg.model.vocab_size = tokenizer.vocab_size
    cfg.save(run_dir / CONFIG_FILE)

    # ---- model, optimizer, stream
    torch.manual_seed(tcfg.seed)
    model = MoETransformer(cfg.model).to(device)
    if init_from is not None and not resume:
        load_init_weights(model, Path(init_from), tokenizer, run_dir)
    for _, layer in model.moe_layers():
        layer.aux_loss_scale = 1.0 / tcfg.grad_accum
    optimizer = build_optimizer(model, tcfg)
    from moelab.layers.balancing import install_aux_free_hook

    install_aux_free_hook(optimizer, model)
    stream = TrainStream(data.tokens["train"], tokenizer, cfg.data.seq_len, tcfg.batch_size, cfg.data.seed,
                         domains=data.splits.domains)
    step, tokens_seen = 0, 0
    if resume:
        found = ckpt.list_checkpoints(run_dir / CKPT_DIR)
        if found:
            model_sd, optim_sd, state = ckpt.read_checkpoint(found[-1][1])
            model.load_state_dict(model_sd)
            optimizer.load_state_dict(optim_sd)
            stream.load_state_dict(state["data"])
            ckpt.set_rng_state(state["rng"])
            step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        for name in (METRICS_FILE, EVAL_FILE):
            truncate_after(run_dir / name, step)
    fwd = torch.compile(model) if tcfg.compile else model
    params = model.num_parameters()

    metrics, evals = JsonlLog(run_dir / METRICS_FILE), JsonlLog(run_dir / EVAL_FILE)
    last = until_step if until_step is not None else tcfg.steps
    bar = Progress(tcfg.steps, step, mode=progress, log_every=tcfg.log_every)
    bar.write(f"moelab: training {params['total']:,} parameters ({params['active']:,} active per token) "
              f"on {device}, steps {step}..{last} -> {run_dir}")
    stop, restore_sigint = _stop_on_sigint()
    good = {"rng": ckpt.rng_state(), "data": stream.state_dict(), "step": step, "tokens_seen": tokens_seen}
    session_tokens, session_time, interrupted, last_eval = 0, 0.0, False, None
    recent: list[dict] = []

    def save(at: dict) -> None:
        extra = {"data": at["data"], "tokens_seen": at["tokens_seen"], "lr": lr_at(max(at["step"], 1), tcfg),
                 "schedule": {"kind": "warmup_cosine", "lr": tcfg.lr, "warmup_steps": tcfg.warmup_steps,
                              "steps": tcfg.steps, "min_lr_ratio": tcfg.min_lr_ratio}}
        ckpt.save_checkpoint(run_dir / CKPT_DIR, at["step"], model, optimizer, extra,
                             keep_last=tcfg.keep_last, rng=at["rng"])

    def run_eval(at_step: int) -> dict:
        result = evaluate(fwd, data.tokens["val"], tokenizer, data.splits.domains, seq_len=cfg.data.seq_len,
                          batch_size=tcfg.eval_batch_size or tcfg.batch_size, max_batches=tcfg.eval_max_batches,
                          device=device, dtype=tcfg.dtype, cache_dir=cfg.data.cache_dir)
        result = {"step": at_step, **result}
        evals.write(result)
        bar.write(f"eval step {at_step}: val_loss={result['val_loss']:.4f} val_ppl={result['val_ppl']:.2f}")
        return result

    try:
        model.train()
        while step < last and not stop["stop"]:
            t0 = time.perf_counter()
            lr = lr_at(step + 1, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = lm_sum = aux_sum = 0.0
            n_tokens = 0
            for _ in range(tcfg.grad_accum):
                batch = stream.next_batch().to(device)
                with autocast(device, tcfg.dtype):
                    out = fwd(batch.input_ids_BL, labels_BL=batch.labels_BL, valid_BL=batch.valid_BL)
                (out.loss / tcfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                lm_sum += float(out.lm_loss.detach())
                aux_sum += float(out.aux_loss)
                n_tokens += batch.n_valid
            grad_norm = None
            if tcfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_tokens
            dt = time.perf_counter() - t0
            session_tokens, session_time = session_tokens + n_tokens, session_time + dt
            record = {"step": step, "loss": loss_sum / tcfg.grad_accum, "lm_loss": lm_sum / tcfg.grad_accum,
                      "aux_loss": aux_sum / tcfg.grad_accum, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": n_tokens / dt, "tokens": tokens_seen,
                      "layers": [{"layer": i, **jsonable(getattr(layer, "last_stats", {}) or {})}
                                 for i, layer in model.moe_layers()]}
            metrics.write(record)
            recent = (recent + [record])[-50:]
            good = {"rng": ckpt.rng_state(), "data": stream.state_dict(), "step": step, "tokens_seen": tokens_seen}
            bar.update(step, loss=record["loss"], tok_s=record["tokens_per_s"], lr=lr)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                last_eval = run_eval(step)
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < last:
                save(good)
        interrupted = stop["stop"] and step < last
    except KeyboardInterrupt:
        interrupted = True
    finally:
        restore_sigint()
        metrics.close()
    try:
        if interrupted:
            bar.write(f"interrupted: saving a checkpoint at step {good['step']}")
        if good["step"] > 0:
            save(good)
        if step >= tcfg.steps and not interrupted:
            last_eval = run_eval(step)
    finally:
        evals.close()
        bar.close()
    summary = _summary(run_dir, cfg, step, params, last_eval, recent, session_tokens, session_time, interrupted)
    (run_dir / SUMMARY_FILE).write_text(_dumps(summary))
    return summary


def _summary(run_dir: Path, cfg: RunConfig, step: int, params: dict, last_eval: dict | None, recent: list[dict],
             session_tokens: int, session_time: float, interrupted: bool) -> dict[str, Any]:
    if last_eval is None:
        done = read_jsonl(run_dir / EVAL_FILE)
        last_eval = done[-1] if done else {}
    layers = [layer for r in recent for layer in r.get("layers", [])]

    def mean(key: str) -> float | None:
        vals = [layer[key] for layer in layers if isinstance(layer.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    return {
        "step": step, "steps": cfg.train.steps, "interrupted": interrupted,
        "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
        "per_domain": last_eval.get("per_domain", {}), "eval_step": last_eval.get("step"),
        "train_loss": recent[-1]["loss"] if recent else None,
        "tokens_per_s": session_tokens / session_time if session_time else None,
        "train_time_s": session_time,
        "load_max_over_mean": mean("load_max_over_mean"), "load_cv": mean("load_cv"),
        "params_total": params["total"], "params_active": params["active"],
    }


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(jsonable(obj), indent=2) + "\n"

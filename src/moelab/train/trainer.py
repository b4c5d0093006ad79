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

Health (moelab.train.monitor): every step checks the loss and the gradient norm before the
optimizer step; a non-finite one stops the run with :class:`TrainingDiverged` naming the step (or
is skipped, ``train.on_nonfinite="skip"``), and no checkpoint with non-finite weights is ever
written. A loss worse than uniform guessing and routing collapse are warned about in the log and
in the step's ``warnings`` list of metrics.jsonl (and in summary.json).

Resume: stale ``.tmp-*`` folders are deleted; the newest checkpoint that verifies (weights,
optimizer and state.json checksums, step = folder name) is used, with a warning for each corrupt
newer one.

Ctrl-C: the first SIGINT asks the loop to stop after the current step; it then saves a checkpoint
and returns (``summary["interrupted"]``). A KeyboardInterrupt raised elsewhere also saves the last
completed step before returning.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from moelab.models.causality import non_causal_layers
from moelab.models.transformer import MoETransformer
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.data.corpus import atomic_write_bytes
from moelab.train.loggers import Loggers, check_backends
from moelab.train.metrics import JsonlLog, jsonable, read_jsonl, truncate_after
from moelab.train.monitor import CollapseMonitor, TrainingDiverged, above_uniform_message, is_finite, nonfinite_message
from moelab.train.progress import Progress

CONFIG_FILE, MANIFEST_FILE, TOKENIZER_FILE = "config.json", "data_manifest.json", "tokenizer.json"
METRICS_FILE, EVAL_FILE, SUMMARY_FILE, CKPT_DIR = "metrics.jsonl", "eval.jsonl", "summary.json", "checkpoints"
EVAL_WINDOWS_FILE = "eval_windows.json"  # the latest evaluation's per-window losses (paired eval noise)


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
             dtype: str = "float32", cache_dir: str | None = None, progress: bool = False,
             windows: bool = False) -> dict[str, Any]:
    """Token-weighted validation loss and perplexity, overall and per domain.

    Returns ``{"val_loss", "val_ppl", "tokens", "per_domain": {domain: {"loss", "ppl", "tokens"}},
    "causal", "non_causal_layers", "val_loss_se", "windows"}``; ``max_batches`` caps the batches per
    domain. Routers run in eval mode, i.e. in their causal inference mode where they have one
    (expert-choice: token-choice); ``causal`` is False (and ``non_causal_layers`` names them) when
    some router has none (SMEAR ``merge="sequence"``, expert-choice ``eval_routing="expert_choice"``):
    that number then uses later tokens and is not a language-model perplexity. ``val_loss_se``:
    bootstrap standard error over the evaluation windows (:mod:`moelab.train.evalnoise`).
    ``progress``: a tqdm bar (stderr). ``windows``: also return ``window_nll`` and ``window_tokens``
    (summed loss and token count of each evaluation window, in window order) for paired comparisons.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.eval()
    non_causal = non_causal_layers(model)  # routers without a causal eval mode: the number leaks the future
    nll = defaultdict(float)
    count = defaultdict(int)
    win_nll: list[float] = []
    win_count: list[int] = []
    try:
        for batch in tqdm(eval_batches(docs, tokenizer, seq_len, batch_size, domains, max_batches=max_batches,
                                       cache_dir=cache_dir), desc="evaluating", unit="batch", disable=None if progress else True,
                          leave=False):
            batch = batch.to(device)
            with autocast(device, dtype):
                logits_BLV = model(batch.input_ids_BL).logits
            nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), batch.labels_BL, ignore_index=-100,
                                     reduction="none")
            for di in batch.domain_B.unique().tolist():
                rows = batch.domain_B == di
                nll[di] += float(nll_BL[rows].sum())
                count[di] += int(batch.valid_BL[rows].sum())
            win_nll += nll_BL.sum(1).tolist()
            win_count += batch.valid_BL.sum(1).tolist()
    finally:
        model.train(was_training)
    per_domain = {}
    for di, n in sorted(count.items()):
        if n:
            loss = nll[di] / n
            per_domain[domains[di]] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}
    total = sum(count.values())
    loss = sum(nll.values()) / total if total else float("nan")
    from moelab.train.evalnoise import bootstrap_se

    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)) if total else float("nan"),
           "tokens": total, "per_domain": per_domain, "causal": not non_causal, "non_causal_layers": non_causal,
           "val_loss_se": bootstrap_se(win_nll, win_count), "windows": len(win_nll)}
    return {**out, "window_nll": win_nll, "window_tokens": win_count} if windows else out


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



def _forward_backward(fwd, model: torch.nn.Module, stream: TrainStream, tcfg, device: torch.device,
                      step_no: int) -> tuple[dict[str, float], int, float, str | None]:
    """``grad_accum`` micro-batches of forward + backward, then the global gradient norm (clipped when
    ``grad_clip > 0``). Returns ``(sums of loss/lm_loss/aux_loss, tokens, grad_norm, why)``; a layer's
    own non-finite check (router logits) makes the loss NaN with ``why`` its message."""
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
    n_tokens = 0
    try:
        for _ in range(tcfg.grad_accum):
            batch = stream.next_batch().to(device)
            with autocast(device, tcfg.dtype):
                out = fwd(batch.input_ids_BL, labels_BL=batch.labels_BL, valid_BL=batch.valid_BL)
            (out.loss / tcfg.grad_accum).backward()
            sums["loss"] += float(out.loss.detach())
            sums["lm_loss"] += float(out.lm_loss.detach())
            sums["aux_loss"] += float(out.aux_loss)
            n_tokens += batch.n_valid
    except MoelabError as e:
        if "finite" not in str(e):
            raise MoelabError(f"at step {step_no}: {e}") from e
        return {k: float("nan") for k in sums}, n_tokens, float("nan"), str(e)
    return sums, n_tokens, _grad_norm(model, tcfg.grad_clip), None


def _grad_norm(model: torch.nn.Module, clip: float) -> float:
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _resume(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: TrainStream,
            warn: Callable[[str], None]) -> tuple[int, int, dict | None]:
    """Load the newest valid checkpoint (moving corrupt newer ones aside); returns (step, tokens_seen,
    the lr schedule it was trained with)."""
    root = run_dir / CKPT_DIR
    found = ckpt.read_newest_valid(root, warn=warn)
    step = tokens = 0
    schedule = None
    if found is not None:
        path, (model_sd, optim_sd, state) = found
        for _, p in ckpt.list_checkpoints(root):
            if p.name > path.name:  # corrupt and newer: out of the step_* namespace, kept for inspection
                aside = p.with_name(f"corrupt-{p.name}-{int(time.time())}")
                p.rename(aside)
                warn(f"moved the corrupt checkpoint {p.name} to {aside.name}; resuming from {path.name}")
        ckpt.load_model_state(model, model_sd, path)
        try:
            optimizer.load_state_dict(optim_sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise MoelabError(f"checkpoint {str(path)!r}: its optimizer state does not fit this model ({e})") from None
        stream.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        step, tokens = int(state["step"]), int(state.get("tokens_seen", 0))
        schedule = state.get("schedule")
    for name in (METRICS_FILE, EVAL_FILE):
        truncate_after(run_dir / name, step, warn=warn)
    return step, tokens, schedule


def schedule_for_resume(tcfg, saved: dict | None, step: int, write: Callable[[str], None]):
    """The TrainConfig whose ``steps`` the lr schedule follows after resuming at ``step``.

    Unchanged train.steps: ``tcfg``. Changed (extending or shortening a run): ``train.resume_schedule``
    "stretch" re-spreads the cosine over the new train.steps; "continue" keeps the checkpoint's (past
    its end the lr stays at its minimum). Either way one log line says what the lr does."""
    old = int(saved.get("steps", tcfg.steps)) if saved else tcfg.steps
    if old == tcfg.steps or step == 0:
        return tcfg
    before = dataclasses.replace(tcfg, steps=old)
    sched = tcfg if tcfg.resume_schedule == "stretch" else before
    how = (f"the cosine is re-stretched over {tcfg.steps} steps" if sched is tcfg
           else f"the checkpoint's {old}-step schedule continues")
    write(f"resume: train.steps {old} -> {tcfg.steps}, train.resume_schedule={tcfg.resume_schedule!r}: {how}; "
          f"lr {lr_at(step, before):.3g} at step {step} -> {lr_at(step + 1, sched):.3g} at step {step + 1} "
          f"(set train.resume_schedule={'continue' if sched is tcfg else 'stretch'!r} for the other behaviour)")
    return sched


class _Health:
    """The per-step checks of moelab.train.monitor, with what they need to remember."""

    def __init__(self, tcfg, vocab_size: int, model: torch.nn.Module) -> None:
        self.tcfg, self.vocab_size, self.model = tcfg, vocab_size, model
        self.collapse = CollapseMonitor(tcfg.collapse_window, tcfg.collapse_ratio)
        self.warnings: list[str] = []  # every warning of this session (summary.json)
        self.pending: list[str] = []
        self.skipped = 0  # consecutive skipped steps
        self.warned_uniform = False
        self.diverged_at: int | None = None

    def snapshot(self) -> dict[str, torch.Tensor] | None:
        """The model's buffers (aux-free biases, load accumulators, schedules) before a step (skip mode)."""
        if self.tcfg.on_nonfinite != "skip":
            return None
        return {k: v.detach().clone() for k, v in self.model.named_buffers()}

    def nonfinite(self, step: int, loss: float, grad_norm: float, lr: float, buffers: dict | None,
                  why: str | None) -> str | None:
        """A step with a non-finite loss or gradient norm: the fatal message, or None when it is skipped."""
        msg = nonfinite_message(step, loss, grad_norm, lr) + (f" [{why}]" if why else "")
        if self.tcfg.on_nonfinite != "skip" or self.skipped >= self.tcfg.max_skipped_steps:
            if self.skipped:
                msg += f"; {self.skipped} consecutive steps were skipped before it (train.max_skipped_steps)"
            self.diverged_at = step
            return msg
        self.skipped += 1
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                if name in buffers:
                    buf.copy_(buffers[name])
        self.pending.append(f"warning: skipped step {step} (loss={loss!r}, grad_norm={grad_norm!r}); "
                            "its update was not applied")
        return None

    def check(self, step: int, record: dict[str, Any]) -> list[str]:
        """This step's warnings: skipped, loss above uniform, routing collapse."""
        warns, self.pending = self.pending, []
        if not record.get("skipped"):
            self.skipped = 0
        lm = record.get("lm_loss")
        if not self.warned_uniform and lm is not None and math.isfinite(lm) and lm > math.log(self.vocab_size) + 1:
            self.warned_uniform = True
            warns.append(above_uniform_message(step, lm, self.vocab_size))
        ks = {i: getattr(getattr(layer, "cfg", None), "k", None) for i, layer in self.model.moe_layers()}
        warns += self.collapse.update(step, [(r["layer"], r, ks.get(r["layer"])) for r in record["layers"]])
        self.warnings += warns
        return warns

    def check_eval(self, result: dict | None, write: Callable[[str], None]) -> None:
        if not result:
            return
        loss, bound = result.get("val_loss"), math.log(self.vocab_size) + 1
        if loss is None or not math.isfinite(loss) or loss > bound:
            msg = (f"warning: final val_loss {loss!r} (val_ppl {result.get('val_ppl')!r}) is above ln(vocab_size) + 1 "
                   f"= {bound:.3f}: the model is worse than uniform guessing (the run diverged; lower train.lr)")
            self.warnings.append(msg)
            write(msg)
# --------------------------------------------------------------------------- init from another run


def _load_init(init_from: str | None) -> Any:
    """The ``LoadedRun`` that starts this run (``train.init_from``), or None."""
    if not init_from:
        return None
    from moelab.train.run import load_run

    return load_run(init_from)


def _init_model(cfg: RunConfig, init: Any, run_dir: Path) -> torch.nn.Module:
    """A fresh ``MoETransformer``, or the ``init_from`` run's model: its weights (same architecture),
    or the imported Hugging Face model itself (its ``hf`` section and folder are copied into ``run_dir``)."""
    if init is None:
        return MoETransformer(cfg.model)
    from moelab.models.hf.model import HFMoEModel

    if isinstance(init.model, HFMoEModel):
        from moelab.models.hf.run import copy_hf_section

        copy_hf_section(init.run_dir, run_dir, init.model)
        return init.model
    model = MoETransformer(cfg.model)
    try:
        model.load_state_dict(init.model.state_dict())
    except RuntimeError as e:
        raise MoelabError(f"train.init_from={str(init.run_dir)!r}: its weights do not fit this model config "
                          f"(keep the model/moe settings of that run): {str(e).splitlines()[0]}") from None
    _write(run_dir / "init_from.json", {"run": str(init.run_dir), "step": int(init.step)})
    return model



# --------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: str = "auto", until_step: int | None = None,
          init_hook: Callable[[torch.nn.Module], dict[str, Any] | None] | None = None,
          init_from: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (layout: docs/INTERFACES.md, "run directory"); return the summary.

    ``resume`` continues from the newest checkpoint (its config is ``cfg``: pass the saved one, with
    any overrides). ``overwrite`` replaces an existing run directory. ``progress``: "auto", "bar",
    "log" or "off". ``until_step`` stops early (with a checkpoint) after that step, the schedule
    still following ``train.steps`` (for time-sliced jobs and tests). ``init_hook(model)`` runs once
    on the freshly initialised model of a run that starts at step 0 (sweeps use it for common random
    numbers, :mod:`moelab.sweep.crn`); what it returns is logged. ``init_from`` (a run directory; same
    as ``train.init_from``) starts from that run's newest weights with a fresh optimizer and schedule
    (a continued run, as OLMoE advises for upcycled models); ``cfg.model`` must describe those weights.
    """
    run_dir = Path(run_dir)
    if init_from is not None:
        cfg.train.init_from = str(init_from)
    cfg.validate()
    check_backends(cfg.train.log)  # a missing tensorboard/wandb fails before anything is written
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tcfg = cfg.train
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = pick_device(tcfg.device)

    # ---- data and tokenizer
    init = _load_init(tcfg.init_from)
    data = prepare_data(cfg.data, tokenizer=None if init is None else init.tokenizer)
    tokenizer = data.tokenizer
    if resume and (run_dir / TOKENIZER_FILE).is_file():
        saved = Tokenizer.load(run_dir / TOKENIZER_FILE)
        if saved.fingerprint != tokenizer.fingerprint:
            raise MoelabError(f"the data of run_dir={str(run_dir)!r} changed (tokenizer differs); cannot resume exactly")
    tokenizer.save(run_dir / TOKENIZER_FILE)
    _write(run_dir / MANIFEST_FILE, data.manifest)
    if init is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    cfg.save(run_dir / CONFIG_FILE)

    # ---- model, optimizer, stream
    torch.manual_seed(tcfg.seed)
    model = _init_model(cfg, init, run_dir).to(device)
    if tcfg.only == "routers":
        from moelab.models.router_swap import freeze_all_but_routers

        freeze_all_but_routers(model)
    for _, layer in model.moe_layers():
        layer.aux_loss_scale = 1.0 / tcfg.grad_accum
    init_note = init_hook(model) if init_hook is not None and not ckpt.list_checkpoints(run_dir / CKPT_DIR) else None
    optimizer = build_optimizer(model, tcfg)
    from moelab.layers.balancing import install_aux_free_hook

    install_aux_free_hook(optimizer, model)
    stream = TrainStream(data.tokens["train"], tokenizer, cfg.data.seq_len, tcfg.batch_size, cfg.data.seed,
                         domains=data.splits.domains)
    early: list[str] = []  # messages from before the progress bar exists
    for name, what in (data.manifest.get("non_utf8_files") or {}).items():
        early.append(f"warning: corpus file {name!r} is not valid UTF-8 ({what})")
    for name in ckpt.clean_stale(run_dir / CKPT_DIR):
        early.append(f"removed the stale checkpoint folder {name} (left by an interrupted save)")
    step, tokens_seen, sched = 0, 0, tcfg
    if resume:
        step, tokens_seen, saved_schedule = _resume(run_dir, model, optimizer, stream, early.append)
        sched = schedule_for_resume(tcfg, saved_schedule, step, early.append)
    fwd = torch.compile(model) if tcfg.compile else model
    params = model.num_parameters()
    has_val = len(data.tokens["val"].tokens) > 0

    metrics, evals = JsonlLog(run_dir / METRICS_FILE), JsonlLog(run_dir / EVAL_FILE)
    live = Loggers(tcfg.log, run_dir, cfg.to_dict(), tcfg.log_heatmap_every)  # TensorBoard / W&B, if chosen
    last = until_step if until_step is not None else tcfg.steps
    bar = Progress(tcfg.steps, step, mode=progress, log_every=tcfg.log_every)
    for msg in early:
        bar.write(msg)
    if not has_val:
        bar.write(f"warning: the val split is empty (data.val_fraction={cfg.data.val_fraction}); no evaluation, "
                  "summary.json will have no val_loss")
    bar.write(f"moelab: training {params['total']:,} parameters ({params['active']:,} active per token) "
              f"on {device}, steps {step}..{last} -> {run_dir}")
    if init_note:
        bar.write(f"moelab: init hook: {_dumps(init_note)}")
    stop, restore_sigint = _stop_on_sigint()
    good = {"rng": ckpt.rng_state(), "data": stream.state_dict(), "step": step, "tokens_seen": tokens_seen}
    session_tokens, session_time, interrupted, last_eval = 0, 0.0, False, None
    recent: list[dict] = []
    health = _Health(tcfg, cfg.model.vocab_size, model)

    def save(at: dict) -> None:
        extra = {"data": at["data"], "tokens_seen": at["tokens_seen"], "lr": lr_at(max(at["step"], 1), sched),
                 "schedule": {"kind": "warmup_cosine", "lr": tcfg.lr, "warmup_steps": tcfg.warmup_steps,
                              "steps": sched.steps, "min_lr_ratio": tcfg.min_lr_ratio}}
        ckpt.save_checkpoint(run_dir / CKPT_DIR, at["step"], model, optimizer, extra,
                             keep_last=tcfg.keep_last, rng=at["rng"])

    def run_eval(at_step: int) -> dict | None:
        if not has_val:
            return None
        result = evaluate(fwd, data.tokens["val"], tokenizer, data.splits.domains, seq_len=cfg.data.seq_len,
                          batch_size=tcfg.eval_batch_size or tcfg.batch_size, max_batches=tcfg.eval_max_batches,
                          device=device, dtype=tcfg.dtype, cache_dir=cfg.data.cache_dir, windows=True)
        result = {"step": at_step, **result}
        _write(run_dir / EVAL_WINDOWS_FILE, {"step": at_step, "nll": result.pop("window_nll"),
                                            "tokens": result.pop("window_tokens")})
        evals.write(result)
        live.log_eval(result)
        bar.write(f"eval step {at_step}: val_loss={result['val_loss']:.4f} val_ppl={result['val_ppl']:.2f}")
        return result

    try:
        model.train()
        while step < last and not stop["stop"]:
            t0 = time.perf_counter()
            lr = lr_at(step + 1, sched)
            for group in optimizer.param_groups:
                group["lr"] = lr
            buffers = health.snapshot()
            sums, n_tokens, grad_norm, why = _forward_backward(fwd, model, stream, tcfg, device, step + 1)
            bad = not (is_finite(sums["loss"]) and is_finite(grad_norm))
            fatal = health.nonfinite(step + 1, sums["loss"], grad_norm, lr, buffers, why) if bad else None
            if not bad:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_tokens
            dt = time.perf_counter() - t0
            session_tokens, session_time = session_tokens + n_tokens, session_time + dt
            record = {"step": step, **{k: v / tcfg.grad_accum for k, v in sums.items()}, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": n_tokens / dt, "tokens": tokens_seen,
                      "layers": [{"layer": i, **jsonable(getattr(layer, "last_stats", {}) or {})}
                                 for i, layer in model.moe_layers()]}
            if fatal:
                metrics.write({**record, "error": fatal})
                raise TrainingDiverged(fatal)
            if bad:
                record["skipped"] = True
            warns = health.check(step, record)
            if warns:
                record["warnings"] = warns
                for w in warns:
                    bar.write(w)
            metrics.write(record)
            live.log_step(record)
            recent = (recent + [record])[-50:]
            good = {"rng": ckpt.rng_state(), "data": stream.state_dict(), "step": step, "tokens_seen": tokens_seen}
            bar.update(step, loss=record["loss"], tok_s=record["tokens_per_s"], lr=lr)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                last_eval = run_eval(step) or last_eval
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < last:
                save(good)
        interrupted = stop["stop"] and step < last
    except KeyboardInterrupt:
        interrupted = True
    except TrainingDiverged as e:
        bar.write(f"error: {e}")
        _write(run_dir / SUMMARY_FILE, {**_summary(run_dir, cfg, good["step"], params, last_eval, recent, session_tokens,
                                                   session_time, False, health.warnings),
                                        "error": str(e), "diverged_at_step": health.diverged_at})
        evals.close()
        live.close()
        bar.close()
        raise
    finally:
        restore_sigint()
        metrics.close()
    try:
        if interrupted:
            bar.write(f"interrupted: saving a checkpoint at step {good['step']}")
        if good["step"] > 0:
            save(good)
        if step >= tcfg.steps and not interrupted:
            last_eval = run_eval(step) or last_eval
            health.check_eval(last_eval, bar.write)
    finally:
        evals.close()
        live.close()
        bar.close()
    summary = _summary(run_dir, cfg, step, params, last_eval, recent, session_tokens, session_time, interrupted,
                       health.warnings)
    _write(run_dir / SUMMARY_FILE, summary)
    return summary


def _summary(run_dir: Path, cfg: RunConfig, step: int, params: dict, last_eval: dict | None, recent: list[dict],
             session_tokens: int, session_time: float, interrupted: bool,
             warnings: list[str] | None = None) -> dict[str, Any]:
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
        "val_loss_se": last_eval.get("val_loss_se"), "eval_windows": last_eval.get("windows"),
        "train_loss": recent[-1]["loss"] if recent else None,
        "tokens_per_s": session_tokens / session_time if session_time else None,
        "train_time_s": session_time,
        "load_max_over_mean": mean("load_max_over_mean"), "load_cv": mean("load_cv"),
        "balance_steps": [recent[0]["step"], recent[-1]["step"]] if recent else None,
        "params_total": params["total"], "params_active": params["active"],
        "warnings": list(warnings or []),
    }


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(jsonable(obj), indent=2) + "\n"


def _write(path: Path, obj: Any) -> None:
    """A JSON file of the run directory, written atomically."""
    atomic_write_bytes(path, _dumps(obj).encode())


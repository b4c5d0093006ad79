"""``finetune(base_run, adapter_cfg, out, overrides)``: fine-tune adapters on a frozen dense run.

The base run's config supplies the model and (with ``--data.*`` overrides, e.g. a new
``data.source``) the data; ``train.*`` overrides set the loop (steps, lr, batch size, warmup). Text is
tokenised with the *base run's* tokenizer (the model's vocabulary), never a new one. The loop is the
trainer's (AdamW over the adapter parameters only, warmup + cosine ``lr_at``, gradient clipping); the
adapters' balance losses reach the gradient through their outputs. Writes ``OUT/adapters.safetensors``
+ ``OUT/adapter.json`` (the adapters only, apart from the base), ``OUT/metrics.jsonl`` and
``OUT/summary.json`` (val loss/ppl per domain before and after, trainable parameters, peak memory:
the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU; compare runs made in
separate processes). With ``merge`` (plain LoRA only) also ``OUT/merged/``, an ordinary run directory
of the base with the LoRA folded in.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from moelab.data.corpus import load_corpus
from moelab.data.loader import TrainStream, tokenize_documents
from moelab.errors import MoelabError
from moelab.ops.lora.apply import add_adapters, merge_lora, save_adapters, trainable_parameters
from moelab.ops.lora.base import AdapterConfig
from moelab.train import checkpoint as ckpt
from moelab.train.config import apply_overrides
from moelab.train.metrics import JsonlLog
from moelab.train.progress import Progress
from moelab.train.run import load_run
from moelab.train.trainer import CKPT_DIR, CONFIG_FILE, TOKENIZER_FILE, evaluate, lr_at, pick_device


def _prepare(run, overrides: list[str]):
    cfg = apply_overrides(run.config, list(overrides)).validate()
    splits = load_corpus(cfg.data)
    if not splits.train or not splits.val:
        raise MoelabError(f"data.source={cfg.data.source!r} gives {len(splits.train)} train and {len(splits.val)} "
                          "val documents; fine-tuning needs both")
    tokens = {s: tokenize_documents(splits.split(s), run.tokenizer, cache_dir=cfg.data.cache_dir) for s in ("train", "val")}
    return cfg, splits, tokens


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finetune(base_run: str | Path, adapter_cfg: AdapterConfig, out: str | Path, overrides: list[str] = (), *,
             merge: bool = False, overwrite: bool = False, progress: str = "auto") -> dict[str, Any]:
    out = Path(out)
    if merge and adapter_cfg.adapter != "lora":
        raise MoelabError(f"--merge folds a single LoRA; adapter={adapter_cfg.adapter!r} is not 'lora'")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MoelabError(f"out={str(out)!r} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    run = load_run(base_run)
    cfg, splits, tokens = _prepare(run, overrides)
    tc = cfg.train
    device = pick_device(tc.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = add_adapters(run.model.float(), adapter_cfg).to(device)
    for m in model.modules():
        if hasattr(m, "aux_loss_scale"):
            m.aux_loss_scale = 1.0 / tc.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=tc.weight_decay)
    stream = TrainStream(tokens["train"], run.tokenizer, cfg.data.seq_len, tc.batch_size, cfg.data.seed,
                         domains=splits.domains)

    def run_eval() -> dict:
        return evaluate(model, tokens["val"], run.tokenizer, splits.domains, seq_len=cfg.data.seq_len,
                        batch_size=tc.eval_batch_size or tc.batch_size, max_batches=tc.eval_max_batches,
                        device=device, cache_dir=cfg.data.cache_dir)

    out.mkdir(parents=True, exist_ok=True)
    before = run_eval()
    train_s, n_tokens = _loop(model, opt, params, stream, tc, device, out, progress)
    after = run_eval()
    base_state = json.loads((ckpt.find_checkpoint(Path(base_run) / CKPT_DIR) / ckpt.STATE_FILE).read_text())
    extra = {"base_run": str(base_run), "base_step": run.step, "base_sha256": base_state["sha256"][ckpt.MODEL_FILE]}
    save_adapters(model, adapter_cfg, out, extra)
    summary = {"adapter": adapter_cfg.adapter, "steps": tc.steps, "data_source": cfg.data.source,
               "trainable_params": trainable_parameters(model), "total_params": sum(p.numel() for p in model.parameters()),
               "val_before": before, "val_after": after, "train_time_s": train_s, "tokens_per_s": n_tokens / train_s,
               "peak_memory_mb": _peak_memory_mb(device), "peak_memory_kind": "cuda" if device.type == "cuda" else "rss"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if merge:
        _write_merged(model, run, cfg, out / "merged", Path(base_run))
    return summary


def _loop(model, opt, params, stream, tc, device, out: Path, progress: str) -> tuple[float, int]:
    """The optimisation loop (the trainer's: warmup + cosine lr, accumulation, clipping); returns
    (seconds, tokens)."""
    torch.manual_seed(tc.seed)
    log, bar = JsonlLog(out / "metrics.jsonl"), Progress(tc.steps, 0, mode=progress, log_every=tc.log_every)
    t0, n_tokens = time.perf_counter(), 0
    model.train()
    try:
        for step in range(1, tc.steps + 1):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tc)
            total = 0.0
            for _ in range(tc.grad_accum):
                b = stream.next_batch().to(device)
                loss = model(b.input_ids_BL, labels_BL=b.labels_BL, valid_BL=b.valid_BL).lm_loss
                (loss / tc.grad_accum).backward()
                total += float(loss.detach()) / tc.grad_accum
                n_tokens += b.n_valid
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.write({"step": step, "lm_loss": total, "lr": lr_at(step, tc), "aux": _aux(model)})
            bar.update(step, loss=total)
    finally:
        log.close()
        bar.close()
    return time.perf_counter() - t0, n_tokens


def _aux(model: torch.nn.Module) -> float:
    return sum(float(v) for m in model.modules() for v in getattr(m, "last_aux", {}).values()
               if not hasattr(m, "cfg") or not hasattr(m, "experts"))


def _write_merged(model, run, cfg, merged: Path, base_run: Path) -> None:
    """The base architecture with the LoRA folded in, as a run directory at step 0."""
    merge_lora(model.cpu())
    merged.mkdir(parents=True)
    cfg.save(merged / CONFIG_FILE)
    shutil.copyfile(base_run / TOKENIZER_FILE, merged / TOKENIZER_FILE)
    ckpt.save_checkpoint(merged / CKPT_DIR, 0, model, None, {"merged_from": str(merged.parent)})

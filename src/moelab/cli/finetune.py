"""``moelab finetune RUN --adapter A --out DIR``: LoRA / mixture-of-LoRA-experts fine-tuning of a frozen
dense run (``moelab.ops.lora``)."""

from __future__ import annotations

import argparse
import json


# the registry's names (ADAPTERS; tests/ops/test_cli_light.py checks them), so that `--help` imports no torch
ADAPTER_NAMES = ('comol', 'dynmole', 'lora', 'mixlora', 'mola', 'smora')


# (name, description, paper) of moelab.ops.lora.ADAPTERS, static so that `--help` imports no torch
# (tests/ops/test_cli_light.py checks it against the registry)
LISTING = [('comol',
            'r x r core experts in one LoRA frame, soft-merged by a low-rank router',
            'CoMoL (core-space mixture of LoRA), seed catalog #36'),
           ('dynmole', 'LoRA experts with Tsallis-entropy hybrid (soft/top-k) routing', 'Li et al. 2025 (DynMoLE)'),
           ('lora', 'one LoRA per FFN projection (mergeable)', 'Hu et al. 2021 (LoRA)'),
           ('mixlora', 'top-k LoRA experts inside each FFN + balance loss', 'Li et al. 2024 (MixLoRA)'),
           ('mola', 'top-k LoRA experts per projection, more experts in higher layers', 'Gao et al. 2024 (MoLA)'),
           ('smora', 'each rank of one LoRA is an expert; rank-wise top-k routing', 'Zhao et al. 2025 (SMoRA)')]


def _listing() -> str:
    return "\n".join(f"  {name:8s} {desc} ({paper})" for name, desc, paper in LISTING)


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.cli.train import _OverrideParser

    p = sub.add_parser("finetune", help="fine-tune LoRA or mixture-of-LoRA-experts adapters on a frozen dense run",
                       usage="moelab finetune RUN --adapter A --out DIR [options] [--data.FIELD V] [--train.FIELD V]",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Freeze RUN's model, add adapters to every dense FFN, train them on RUN's data "
                                   "or --data.source, and write DIR/adapters.safetensors (adapters only), "
                                   "adapter.json, metrics.jsonl and summary.json (val ppl per domain before/after, "
                                   "trainable parameters, peak memory). --train.steps/lr/batch_size set the loop.",
                       epilog=lambda: "adapters:\n" + _listing())
    p.__class__ = _OverrideParser
    p.add_argument("run", metavar="RUN", help="the frozen base run directory (dense FFNs)")
    p.add_argument("--adapter", default="lora", choices=ADAPTER_NAMES, help="adapter (default: lora)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/rank; default 16)")
    p.add_argument("--experts", type=int, default=4, help="LoRA experts per FFN (MoLA: in the top layers; default 4)")
    p.add_argument("--k", type=int, default=2, help="experts (SMoRA: ranks) per token (default 2)")
    p.add_argument("--attention", action="store_true", help="also plain LoRA on the attention projections")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="balance-loss coefficient (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="adapter init seed (default 0)")
    p.add_argument("--merge", action="store_true", help="adapter lora: also write DIR/merged, the base with the "
                   "LoRA folded in (a run directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="training progress: a bar on a terminal, log lines otherwise")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from moelab.ops.lora.base import AdapterConfig
    from moelab.ops.lora.finetune import finetune

    cfg = AdapterConfig(adapter=args.adapter, rank=args.rank, alpha=args.alpha, experts=args.experts, k=args.k,
                        attention=args.attention, aux_loss_coef=args.aux_loss_coef, seed=args.seed)
    s = finetune(args.run, cfg, args.out, args.overrides, merge=args.merge, overwrite=args.overwrite,
                 progress=args.progress)
    brief = {k: s[k] for k in ("adapter", "trainable_params", "peak_memory_mb", "tokens_per_s")}
    brief["val_ppl_before"], brief["val_ppl_after"] = s["val_before"]["val_ppl"], s["val_after"]["val_ppl"]
    brief["per_domain_after"] = {d: v["ppl"] for d, v in s["val_after"]["per_domain"].items()}
    print(json.dumps(brief, indent=1))
    return 0

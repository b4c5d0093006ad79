"""`moelab hf import HF_FOLDER --out RUN` and `moelab hf export RUN --out HF_FOLDER` (issue 14)."""

from __future__ import annotations

import argparse
import json
import time


def cmd_import(args: argparse.Namespace) -> int:
    from moelab.models.hf.run import import_to_run

    t0 = time.perf_counter()
    run = import_to_run(args.folder, args.out, dtype=args.dtype, overwrite=args.overwrite, seq_len=args.seq_len,
                        data_source=args.data, swap_router=args.swap_routers,
                        router_kwargs=json.loads(args.router_kwargs) if args.router_kwargs else None)
    summary = json.loads((run / "summary.json").read_text())
    print(f"imported {summary['family']} from {args.folder} into {run} in {time.perf_counter() - t0:.1f}s "
          f"(params total {summary['params_total']:,}, active {summary['params_active']:,})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moelab.models.hf.export import export_run

    t0 = time.perf_counter()
    out = export_run(args.run, args.out, step=args.step, overwrite=args.overwrite)
    print(f"exported {args.run} to {out} in {time.perf_counter() - t0:.1f}s "
          "(load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hf", help="Hugging Face models in and out (import a local MoE checkpoint, export a run)")
    hs = p.add_subparsers(dest="hf_command", metavar="{import,export}")
    i = hs.add_parser("import", help="a local HF MoE folder (save_pretrained output) -> a moelab run directory")
    i.add_argument("folder", help="local folder with config.json, weights and tokenizer (never downloaded)")
    i.add_argument("--out", required=True, help="run directory to write")
    i.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    i.add_argument("--seq-len", type=int, default=256, help="data.seq_len of the run (eval/analyze windows)")
    i.add_argument("--data", default="embedded", help="data.source of the run (default: the embedded corpus)")
    i.add_argument("--swap-routers", default=None, metavar="ROUTER",
                   help="replace every router by this registered router (initialised from the old one)")
    i.add_argument("--router-kwargs", default=None, help="JSON router_kwargs for --swap-routers")
    i.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    i.set_defaults(func=cmd_import)
    e = hs.add_parser("export", help="a run directory (trained or imported) -> a folder transformers loads")
    e.add_argument("run", help="run directory")
    e.add_argument("--out", required=True, help="folder to write (config.json, safetensors, tokenizer)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.set_defaults(func=cmd_export)
    p.set_defaults(func=lambda a: p.print_help() or 0)

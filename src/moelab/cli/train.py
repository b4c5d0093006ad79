"""``moelab train | eval | generate | info | demo``: the training lab's commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from moelab.cli.main import MoelabParser
from moelab.errors import MoelabError

_DEFAULT_RUN_DIR = "runs/{preset}-{time}"


class _OverrideParser(MoelabParser):
    """A sub-parser that hands every unknown ``--section.field VALUE`` / ``section.field=VALUE``
    argument to the command as ``args.overrides`` (checked against the config's keys there)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", []) or []) + list(extras)
        return namespace, []


def _keys_help() -> str:
    """Every config key with its type and the default of the plain RunConfig (for --help)."""
    from moelab.train.config import RunConfig

    cfg = RunConfig()
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        row = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                continue
            tp = hints[f.name]
            name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            row.append(f"{prefix}{f.name} ({name}, {json.dumps(v)})")
        lines.append("  " + "\n  ".join(row))

    walk(cfg.model, "model.")
    walk(cfg.model.moe, "moe.")
    walk(cfg.model.layout, "layout.")
    walk(cfg.data, "data.")
    walk(cfg.train, "train.")
    return "\n".join(lines)


_OVERRIDES_EPILOG = """\
config overrides (applied after --preset and --config, in order):
  --SECTION.FIELD VALUE or SECTION.FIELD=VALUE, values parsed by the field's type
  (bool: true/false; none/null for optional fields; dict and list fields as JSON,
  e.g. --moe.router_kwargs '{"p": 0.5}' --model.moe_layers '[1, 3]').
  "moe." is short for "model.moe.", "layout." for "model.layout.". Keys (type, default of a bare RunConfig;
  the presets change some, `moelab info RUN` shows a run's values):
"""


def _add_override_help(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = lambda: _OVERRIDES_EPILOG + _keys_help()  # built only when help is printed


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.train.presets import PRESETS

    # ---- train
    p = sub.add_parser("train", help="train an MoE language model into a run directory",
                       usage="moelab train [options] [--SECTION.FIELD VALUE ...]",
                       description="Train an MoE language model. Writes RUN/config.json, metrics.jsonl, "
                                   "eval.jsonl, checkpoints/ and summary.json (see README, 'Configuration'). "
                                   "Ctrl-C saves a checkpoint; --resume continues exactly.")
    p.__class__ = _OverrideParser
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="starting configuration (default: tiny)")
    p.add_argument("--config", metavar="FILE", help="a .toml/.yaml/.json file of sections model/moe/data/train")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/PRESET-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint "
                   "(its saved config, plus any overrides, e.g. --train.steps to extend it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--nproc", type=int, default=None, help="launch N processes with torchrun (data/expert "
                   "parallel: see --parallel.dp/--parallel.ep and `moelab.dist`)")
    p.add_argument("--init-from", metavar="RUN", default=None,
                   help="start from RUN's newest weights and tokenizer with a fresh optimizer and schedule, using "
                        "RUN's config plus any overrides (a run trained here, upcycled with `moelab upcycle`, or "
                        "imported with `moelab hf import`); e.g. with --train.only routers")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="progress bar on a terminal, log lines otherwise (default: auto)")
    _add_override_help(p)
    p.set_defaults(func=cmd_train)

    # ---- eval
    p = sub.add_parser("eval", help="evaluate a run: loss and perplexity overall and per domain",
                       description="Evaluate a run's checkpoint on its validation (or test) split.")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--split", choices=["val", "test"], default="val", help="split to evaluate (default: val)")
    p.add_argument("--max-batches", type=int, help="cap on batches per domain (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default: 16)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)

    # ---- generate
    p = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample a continuation of --prompt from a run's checkpoint.")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample (default: 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--sliding-window", action="store_true", help="continue past the model's max_seq_len, each "
                   "token predicted from the last max_seq_len tokens (default: refuse with an error)")
    p.set_defaults(func=cmd_generate)

    # ---- info
    p = sub.add_parser("info", help="show a run's config, parameter counts and final metrics",
                       description="Show a run's config, parameter counts (total, active per token) and final metrics.")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=cmd_info)

    # ---- demo
    p = sub.add_parser("demo", help="train the tiny MoE model on the embedded corpus and print a summary",
                       usage="moelab demo [--run-dir DIR] [--steps N] [--progress MODE] [--SECTION.FIELD VALUE ...]",
                       description="Train the tiny preset (8 experts, top-2) on the embedded corpus (Python's "
                                   "standard library code and pydoc prose), evaluate it and print val perplexity "
                                   "overall and per domain, load balance and tokens/s. Replaces an earlier run "
                                   "in the run directory.")
    p.__class__ = _OverrideParser
    p.add_argument("--run-dir", metavar="DIR", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the tiny preset's)")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="progress bar on a terminal, log lines otherwise (default: auto)")
    _add_override_help(p)
    p.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------------- commands


def build_config(preset_name: str | None, config_file: str | None, overrides: list[str]):
    from moelab.train.config import RunConfig, apply_dict, apply_overrides, read_config_file
    from moelab.train.presets import preset

    cfg = preset(preset_name) if preset_name else RunConfig()
    if config_file:
        apply_dict(cfg, read_config_file(config_file))
    apply_overrides(cfg, overrides)
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from moelab.train.config import apply_overrides
    from moelab.train.run import load_config
    from moelab.train.trainer import train

    if args.resume:
        if not args.run_dir:
            raise MoelabError("--resume needs --run-dir (the run to continue)")
        cfg = load_config(args.run_dir)
        if args.config:
            raise MoelabError("--config cannot be combined with --resume (the run's saved config is used)")
        apply_overrides(cfg, args.overrides).validate()
    elif getattr(args, "init_from", None):
        if args.config:
            raise MoelabError("--config cannot be combined with --init-from (RUN's saved config is used)")
        cfg = load_config(args.init_from)
        cfg.train.init_from = str(args.init_from)
        apply_overrides(cfg, args.overrides).validate()
    else:
        cfg = build_config(args.preset, args.config, args.overrides)
    run_dir = args.run_dir or _DEFAULT_RUN_DIR.format(preset=args.preset, time=time.strftime("%Y%m%d-%H%M%S"))
    from moelab.cli import dist as dist_cli

    if args.nproc and "WORLD_SIZE" not in os.environ:  # the shorthand: relaunch under torchrun
        argv = dist_cli.strip_nproc(sys.argv[1:]) + ([] if args.run_dir else ["--run-dir", run_dir])
        return dist_cli.launch_torchrun(args.nproc, argv)
    if dist_cli.wants_distributed(cfg, run_dir, args.resume):
        return dist_cli.train_distributed_cli(cfg, run_dir, args)
    summary = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    print(format_summary(summary, cfg, run_dir))
    return 130 if summary["interrupted"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moelab.train.trainer import CONFIG_FILE, train

    extra = ["--train.steps", str(args.steps)] if args.steps is not None else []
    cfg = build_config("tiny", None, extra + args.overrides)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / CONFIG_FILE).is_file():
        raise MoelabError(f"--run-dir={str(run_dir)!r} exists and is not a moelab run directory; choose another")
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, overwrite=True, progress=args.progress)
    print(format_summary(summary, cfg, run_dir, wall_s=time.perf_counter() - t0))
    return 130 if summary["interrupted"] else 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from moelab.data.pipeline import prepare_data
    from moelab.train.run import load_run
    from moelab.train.trainer import evaluate

    run = load_run(args.run, args.step)
    given = run.tokenizer if run.config.data.tokenizer == "pretrained" else None
    data = prepare_data(run.config.data, tokenizer=given)
    if data.tokenizer.fingerprint != run.tokenizer.fingerprint:
        raise MoelabError(f"the data of run {args.run!r} changed since training (tokenizer differs)")
    with torch.inference_mode():
        result = evaluate(run.model, data.tokens[args.split], run.tokenizer, data.splits.domains,
                          seq_len=run.config.data.seq_len, batch_size=args.batch_size, max_batches=args.max_batches,
                          cache_dir=run.config.data.cache_dir, progress=not args.json)
    result = {"run": str(args.run), "step": run.step, "split": args.split, **result}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("all", result["val_loss"], result["val_ppl"], result["tokens"])]
    rows += [(d, r["loss"], r["ppl"], r["tokens"]) for d, r in result["per_domain"].items()]
    print(f"{args.run} step {run.step}, {args.split} split")
    print(_table(["domain", "loss", "ppl", "tokens"], [(d, f"{l:.4f}", f"{p:.2f}", f"{n:,}") for d, l, p, n in rows]))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moelab.errors import check_range
    from moelab.train.run import load_run

    check_range("--max-new-tokens", args.max_new_tokens, low=0)
    check_range("--temperature", args.temperature, low=0.0)
    check_range("--top-k", args.top_k, low=1)
    run = load_run(args.run, args.step)
    ids = run.tokenizer.encode(args.prompt)
    if not ids:
        ids = [run.tokenizer.eos_id]  # an empty prompt starts a new document
    gen = torch.Generator().manual_seed(args.seed)
    out = run.model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, generator=gen, sliding_window=args.sliding_window)
    print(args.prompt + run.tokenizer.decode(out[0, len(ids):].tolist()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from moelab.models.transformer import MoETransformer
    from moelab.train.run import load_config
    from moelab.train.trainer import SUMMARY_FILE

    cfg = load_config(args.run)
    try:  # counting needs shapes only: build on the meta device (no memory, no init cost)
        with torch.device("meta"):
            counts = MoETransformer(cfg.model).num_parameters()
    except Exception:  # noqa: BLE001 -- a layer that cannot be built on meta: build it for real
        counts = MoETransformer(cfg.model).num_parameters()
    from moelab.train.run import read_json_file

    p = Path(args.run) / SUMMARY_FILE
    summary = read_json_file(p) if p.is_file() else {}
    if args.json:
        from moelab.layers.pool import layout_report

        m = cfg.model
        layout = layout_report(m.layout, m.layer_moe_config(), m.moe_layer_indices(), m.d_model)
        print(json.dumps({"config": cfg.to_dict(), "params": counts, "layout": layout, "summary": summary}, indent=2))
        return 0
    m, moe = cfg.model, cfg.model.moe
    print(f"run: {args.run}")
    print(f"model: d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} vocab={m.vocab_size} "
          f"seq_len={cfg.data.seq_len} moe_layers={m.moe_layer_indices()} tie_embeddings={m.tie_embeddings}")
    print(f"moe: router={moe.router} experts={moe.num_experts} k={moe.k} d_ff={moe.d_ff} aux_loss={moe.aux_loss} "
          f"(coef {moe.aux_loss_coef}) aux_free_bias={moe.aux_free_bias} shared={moe.num_shared_experts} "
          f"capacity_factor={moe.capacity_factor}")
    print(f"data: source={cfg.data.source} tokenizer={cfg.data.tokenizer}")
    t = cfg.train
    print(f"train: steps={t.steps} batch_size={t.batch_size} grad_accum={t.grad_accum} lr={t.lr} seed={t.seed}")
    print(f"parameters: total {counts['total']:,}, active per token {counts['active']:,}")
    print(format_layout(cfg.model))
    if summary:
        print(format_metrics(summary))
    else:
        print("no summary.json yet (training not finished)")
    return 0


# --------------------------------------------------------------------------- formatting


def _table(header: list[str], rows: list[tuple]) -> str:
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _window(s: dict[str, Any]) -> str:
    """Which steps the balance numbers average over (as many as there were, up to 50)."""
    span = s.get("balance_steps")
    if not span:
        return "no steps this session"
    n = span[1] - span[0] + 1
    return f"step {span[0]}" if n == 1 else f"mean of steps {span[0]}-{span[1]} ({n} steps)"


def format_metrics(s: dict[str, Any]) -> str:
    at = f"at step {s['eval_step']}" if s.get("eval_step") is not None else "no evaluation yet"
    rows = [("val perplexity (all)", _f(s.get("val_ppl"), ".2f"), f"loss {_f(s.get('val_loss'), '.4f')}, {at}")]
    for d, r in (s.get("per_domain") or {}).items():
        rows.append((f"val perplexity ({d})", _f(r.get("ppl"), ".2f"), f"loss {_f(r.get('loss'), '.4f')}"))
    rows += [
        ("load max/mean", _f(s.get("load_max_over_mean"), ".3f"), f"MoE layers, {_window(s)}"),
        ("load CV", _f(s.get("load_cv"), ".3f"), "std/mean of expert loads, same steps"),
        ("tokens/s", _f(s.get("tokens_per_s"), ",.0f"), "training, this session"),
        ("train loss", _f(s.get("train_loss"), ".4f"), f"at step {s.get('step')} of {s.get('steps')}"),
        ("parameters", f"{s.get('params_total', 0):,}", f"{s.get('params_active', 0):,} active per token"),
    ]
    return _table(["metric", "value", "note"], rows)


def format_layout(m) -> str:
    """The expert layout and its routed-expert parameters next to the matched vanilla model's."""
    from moelab.layers.pool import layout_report

    lay = m.layout
    r = layout_report(lay, m.layer_moe_config(), m.moe_layer_indices(), m.d_model)
    extra = ""
    if lay.kind == "shared_pool":
        extra = (f" pools={lay.n_pools} private_experts={lay.private_experts} pool_loss={lay.pool_loss_mode}"
                 f" (coef {lay.pool_loss_coef})")
    elif lay.kind == "rexmoe":
        extra = f" radius={lay.rexmoe_radius}"
    return (f"layout: {lay.kind} schedule={lay.schedule} router_sharing={lay.router_sharing}{extra}; "
            f"experts per layer {r['experts_per_layer']}, k {r['k_per_layer']}, banks {r['banks']}\n"
            f"expert parameters: {r['routed']:,} ({r['routed_experts']} experts) vs {r['vanilla_routed']:,} "
            f"for the matched vanilla model ({r['vanilla_experts']} experts): {100 * r['fraction']:.1f}%")


def format_summary(s: dict[str, Any], cfg, run_dir, wall_s: float | None = None) -> str:
    m = cfg.model
    head = (f"\nmoelab: {m.n_layers}-layer MoE transformer (d_model {m.d_model}, {m.moe.num_experts} experts, "
            f"top-{m.moe.k}, router {m.moe.router}), {s['step']} steps")
    if wall_s is not None:
        head += f" in {wall_s:.0f} s"
    if s.get("interrupted"):
        head += f" (interrupted; resume with: moelab train --run-dir {run_dir} --resume)"
    return f"{head}\n{format_metrics(s)}\nrun directory: {run_dir}"

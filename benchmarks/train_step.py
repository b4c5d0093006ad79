"""Full training step (forward, backward, AdamW step) of moelab's MoETransformer vs its floor and vs
Hugging Face's MixtralForCausalLM built from an equivalent config, side by side in one process on CPU.

Floor (``dense_floor``): moelab's transformer with every block dense and ``d_ff_dense = k * moe.d_ff``,
i.e. the same active FLOPs per token as the MoE model (k experts of width d_ff each) minus the router:
no MoE implementation can beat it, so ``vs_floor`` (MoE step time / floor step time) is the overhead of
routing + dispatch + balancing. Target: <= 1.15x at tiny and small; >= 1.3x HF tokens/s at equal or lower
peak memory. The moelab MoE step also runs under ``torch.compile`` (``compile_speedup``; ``--no-compile`` skips it;
the first calls, untimed warm-up, pay the compilation).

Equivalent config: same number of layers (all MoE), d_model, heads (no GQA), expert hidden size,
experts, top-k, vocabulary, tied embeddings, RMSNorm/RoPE/SwiGLU; random init; HF with
``attn_implementation="sdpa"`` and its default experts implementation (recorded in the results),
``output_router_logits=True`` so both compute a load-balancing loss. Same batch (random token ids),
same AdamW settings. Timing: ``common.run_cases`` (interleaved rounds, medians); peak memory:
tensor memory allocated during one step (``common.peak_memory_mib``).

    python benchmarks/train_step.py [--presets tiny small] [--rounds 5] [--threads N] [--compile] [--quick]

Writes benchmarks/results/train_step.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, machine_info, markdown_table, run_cases, write_results  # noqa: E402

from moelab.models.transformer import MoETransformer  # noqa: E402
from moelab.train.presets import preset  # noqa: E402


def hf_model(cfg):
    from transformers import MixtralConfig, MixtralForCausalLM

    m, moe = cfg.model, cfg.model.moe
    hf_cfg = MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=moe.d_ff, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.k, max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa",
        output_router_logits=True, router_aux_loss_coef=moe.aux_loss_coef, use_cache=False,
    )
    return MixtralForCausalLM(hf_cfg)


def dense_floor(cfg) -> MoETransformer:
    """The dense model of the same active FLOPs: every block a SwiGLU FFN of width k * d_ff."""
    m = copy.deepcopy(cfg.model)
    m.moe_layers, m.first_k_dense, m.d_ff_dense = "none", 0, m.moe.k * m.moe.d_ff
    return MoETransformer(m)


def make_step(model, opt, input_ids_BL, kind):
    if kind != "hf_mixtral":
        labels_BL = torch.roll(input_ids_BL, -1, dims=1)

        def step():
            out = model(input_ids_BL, labels_BL=labels_BL)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:

        def step():
            out = model(input_ids=input_ids_BL, labels=input_ids_BL)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def bench_preset(name: str, rounds: int, warmup: int, compile_: bool = False) -> list[dict]:
    cfg = preset(name)
    cfg.model.moe_layers = "all"
    cfg.model.first_k_dense = 0
    B, L = cfg.train.batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    input_ids_BL = torch.randint(0, cfg.model.vocab_size, (B, L))
    ours = MoETransformer(cfg.model)
    theirs = hf_model(cfg)
    models = [("moelab", ours), ("dense_floor", dense_floor(cfg)), ("hf_mixtral", theirs)]
    if compile_:
        models.append(("moelab_compiled", torch.compile(copy.deepcopy(ours))))
    cases = []
    for kind, model in models:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        n_params = sum(p.numel() for p in model.parameters())
        cases.append(Case(f"{name}/{kind}", make_step(model, opt, input_ids_BL, kind),
                          {"preset": name, "model": kind, "params": n_params, "tokens": B * L}))
    res = run_cases(cases, rounds=rounds, warmup=warmup)
    rows = []
    for c in cases:
        r = res[c.name]
        rows.append({**c.meta, "median_ms": r["median_ms"], "tokens_per_s": c.meta["tokens"] / r["median_ms"] * 1e3,
                     "peak_mib": r["peak_mib"], "times_ms": r["times_ms"]})
    by = {r["model"]: r for r in rows}
    hf_r, floor_r = by["hf_mixtral"], by["dense_floor"]
    for r in rows:
        r["vs_floor"] = r["median_ms"] / floor_r["median_ms"]
        if r["model"] != "hf_mixtral":
            r["speedup_vs_hf"] = r["tokens_per_s"] / hf_r["tokens_per_s"]
            r["memory_vs_hf"] = r["peak_mib"] / hf_r["peak_mib"]
    if "moelab_compiled" in by:
        by["moelab_compiled"]["compile_speedup"] = by["moelab"]["median_ms"] / by["moelab_compiled"]["median_ms"]
    hf_r["hf_experts_implementation"] = theirs.config._experts_implementation
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the moelab step under torch.compile (default: on, off with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny only, 2 rounds, 1 warm-up (a smoke test)")
    ap.add_argument("--name", default="train_step", help="results file name")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.presets, args.rounds, args.warmup = ["tiny"], 2, 1
    if args.compile is None:
        args.compile = not args.quick
    rows = []
    for name in args.presets:
        new = bench_preset(name, args.rounds, args.warmup, args.compile)
        rows += new
        by = {r["model"]: r for r in new}
        r, hf = by["moelab"], by["hf_mixtral"]
        print(f"{name}: moelab {r['tokens_per_s']:.0f} tok/s = {r['vs_floor']:.2f}x the dense floor's time, "
              f"{r['speedup_vs_hf']:.2f}x HF's tokens/s, peak {r['peak_mib']:.0f} vs HF {hf['peak_mib']:.0f} MiB"
              + (f"; compiled {by['moelab_compiled']['compile_speedup']:.2f}x" if "moelab_compiled" in by else ""),
              flush=True)
    info = machine_info()
    md = [f"# Training step: moelab MoETransformer vs HF MixtralForCausalLM (CPU)\n",
          f"Machine: {info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} threads, "
          f"load average {info['load_avg_1m']:.1f} at {info['time']} (shared machine: ratios are what to compare).",
          "Full step = forward + backward + AdamW step; interleaved rounds, median; peak = tensor memory "
          "allocated during one step. dense_floor = the dense model of the same active FLOPs; vs_floor = step "
          "time / the floor's (target <= 1.15); speedup_vs_hf = tokens/s over HF's (target >= 1.3 at "
          "memory_vs_hf <= 1).\n",
          markdown_table(rows, ["preset", "model", "params", "tokens", "median_ms", "tokens_per_s", "peak_mib",
                                "vs_floor", "speedup_vs_hf", "memory_vs_hf", "compile_speedup",
                                "hf_experts_implementation"])]
    write_results(args.name, {"machine": info, "rows": rows, "rounds": args.rounds, "quick": args.quick},
                  "\n".join(md))


if __name__ == "__main__":
    main()

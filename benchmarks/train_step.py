"""Full training step (forward, backward, AdamW step) of moelab's MoETransformer vs Hugging Face's
MixtralForCausalLM built from an equivalent config, side by side in one process on CPU.

Equivalent config: same number of layers (all MoE), d_model, heads (no GQA), expert hidden size,
experts, top-k, vocabulary, tied embeddings, RMSNorm/RoPE/SwiGLU; random init; HF with
``attn_implementation="sdpa"`` and its default experts implementation (recorded in the results),
``output_router_logits=True`` so both compute a load-balancing loss. Same batch (random token ids),
same AdamW settings. Timing: ``common.run_cases`` (interleaved rounds, medians); peak memory:
tensor memory allocated during one step (``common.peak_memory_mib``).

    python benchmarks/train_step.py [--presets tiny small] [--rounds 5] [--threads N]

Writes benchmarks/results/train_step.json and .md.
"""

from __future__ import annotations

import argparse
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


def make_step(model, opt, input_ids_BL, kind):
    if kind == "moelab":
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


def bench_preset(name: str, rounds: int, warmup: int) -> list[dict]:
    cfg = preset(name)
    cfg.model.moe_layers = "all"
    cfg.model.first_k_dense = 0
    B, L = cfg.train.batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    input_ids_BL = torch.randint(0, cfg.model.vocab_size, (B, L))
    ours = MoETransformer(cfg.model)
    theirs = hf_model(cfg)
    cases = []
    for kind, model in (("moelab", ours), ("hf_mixtral", theirs)):
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
    ours_r, hf_r = rows
    ours_r["speedup_vs_hf"] = ours_r["tokens_per_s"] / hf_r["tokens_per_s"]
    ours_r["memory_vs_hf"] = ours_r["peak_mib"] / hf_r["peak_mib"]
    ours_r["hf_experts_implementation"] = hf_r["hf_experts_implementation"] = theirs.config._experts_implementation
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--name", default="train_step", help="results file name")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.presets:
        rows += bench_preset(name, args.rounds, args.warmup)
        r = rows[-2]
        print(f"{name}: moelab {r['tokens_per_s']:.0f} tok/s, HF {rows[-1]['tokens_per_s']:.0f} tok/s "
              f"({r['speedup_vs_hf']:.2f}x), peak {r['peak_mib']:.0f} vs {rows[-1]['peak_mib']:.0f} MiB", flush=True)
    info = machine_info()
    md = [f"# Training step: moelab MoETransformer vs HF MixtralForCausalLM (CPU)\n",
          f"Machine: {info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} threads, "
          f"load average {info['load_avg_1m']:.1f} at {info['time']} (shared machine: ratios are what to compare).",
          "Full step = forward + backward + AdamW step; interleaved rounds, median; peak = tensor memory "
          "allocated during one step.\n",
          markdown_table(rows, ["preset", "model", "params", "tokens", "median_ms", "tokens_per_s", "peak_mib",
                                "speedup_vs_hf", "memory_vs_hf", "hf_experts_implementation"])]
    write_results(args.name, {"machine": info, "rows": rows, "rounds": args.rounds}, "\n".join(md))


if __name__ == "__main__":
    main()

"""Generation speed: moelab's ``MoETransformer.generate`` (KV cache) vs Hugging Face's
``MixtralForCausalLM.generate`` with its cache, same shapes, side by side in one process on CPU.

Shapes: the ``tiny`` preset (all layers MoE) with ``max_seq_len`` raised to hold prompt + new tokens
(both models get the same limit), random init, a random prompt of ``--prompt-len`` tokens, greedy
decoding of exactly N new tokens (HF: ``do_sample=False``, no EOS, ``min_new_tokens=N``), eval mode,
no grad. Cases: N in {32, 256} x batch in {1, 8}, plus moelab's cache-free path (``use_cache=False``,
the old behaviour) at N=32. Timing: ``common.time_interleaved`` (interleaved rounds, medians); tokens/s
= batch x N / time (prefill included, as a user waits for it).

    python benchmarks/generate.py [--rounds 5] [--threads N] [--quick]

Writes benchmarks/results/generate.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, machine_info, markdown_table, median, time_interleaved, write_results  # noqa: E402
from train_step import hf_model  # noqa: E402

from moelab.models.transformer import MoETransformer  # noqa: E402
from moelab.train.presets import preset  # noqa: E402


def build(prompt_len: int, max_new: int):
    cfg = preset("tiny")
    cfg.model.moe_layers, cfg.model.first_k_dense = "all", 0
    cfg.model.max_seq_len = prompt_len + max_new
    torch.manual_seed(0)
    ours = MoETransformer(cfg.model).eval()
    theirs = hf_model(cfg).eval()
    theirs.config.use_cache = True
    return cfg, ours, theirs


def cases_for(ours, theirs, vocab: int, prompt_len: int, news: list[int], batches: list[int]) -> list[Case]:
    cases = []
    for B in batches:
        prompt_BL = torch.randint(0, vocab, (B, prompt_len), generator=torch.Generator().manual_seed(B))
        for n in news:
            meta = {"batch": B, "new_tokens": n, "tokens": B * n}
            cases.append(Case(f"moelab/B{B}/N{n}", lambda p=prompt_BL, n=n: ours.generate(p, n, temperature=0),
                              {**meta, "model": "moelab"}))
            cases.append(Case(f"hf_mixtral/B{B}/N{n}", lambda p=prompt_BL, n=n: theirs.generate(
                p, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                eos_token_id=None), {**meta, "model": "hf_mixtral"}))
        n = min(news)
        cases.append(Case(f"moelab_nocache/B{B}/N{n}", lambda p=prompt_BL, n=n: ours.generate(
            p, n, temperature=0, use_cache=False), {"batch": B, "new_tokens": n, "tokens": B * n,
                                                    "model": "moelab_nocache"}))
    return cases


def check_lengths(cases: list[Case], prompt_len: int) -> None:
    """Every case generates exactly the requested tokens (a benchmark of unequal work would be meaningless)."""
    for c in cases:
        out = c.fn()
        want = (c.meta["batch"], prompt_len + c.meta["new_tokens"])
        assert tuple(out.shape) == want, (c.name, tuple(out.shape), want)


def rows_from(cases: list[Case], times: dict[str, list[float]]) -> list[dict]:
    rows = [{**c.meta, "median_ms": median(times[c.name]), "times_ms": times[c.name]} for c in cases]
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["median_ms"] * 1e3
    for r in rows:
        if r["model"] != "hf_mixtral":
            hf = [h for h in rows if h["model"] == "hf_mixtral" and h["batch"] == r["batch"]
                  and h["new_tokens"] == r["new_tokens"]]
            r["speedup_vs_hf"] = r["tokens_per_s"] / hf[0]["tokens_per_s"] if hf else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, N=32 and 64 only (a smoke test of the script)")
    ap.add_argument("--name", default="generate", help="results file name")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    news, rounds, warmup = ([32, 64], 3, 1) if args.quick else ([32, 256], args.rounds, args.warmup)
    cfg, ours, theirs = build(args.prompt_len, max(news))
    cases = cases_for(ours, theirs, cfg.model.vocab_size, args.prompt_len, news, [1, 8])
    with torch.no_grad():
        check_lengths(cases, args.prompt_len)
        times = time_interleaved(cases, rounds=rounds, warmup=warmup)
    rows = rows_from(cases, times)
    for r in rows:
        sp = r.get("speedup_vs_hf")
        print(f"{r['model']:15s} B={r['batch']} N={r['new_tokens']:4d}: {r['tokens_per_s']:8.1f} tok/s"
              + (f"  ({sp:.2f}x HF)" if sp else ""), flush=True)
    info = machine_info()
    md = ["# Generation: moelab `generate` (KV cache) vs HF `MixtralForCausalLM.generate` (cache), CPU\n",
          f"Machine: {info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} threads, load average "
          f"{info['load_avg_1m']:.1f} at {info['time']} (shared machine: ratios are what to compare). "
          f"`tiny` shapes, max_seq_len {cfg.model.max_seq_len}, prompt {args.prompt_len} tokens, greedy, "
          f"{rounds} interleaved rounds, medians; tokens/s = batch x new tokens / wall time (prefill included). "
          "Target: moelab >= HF (speedup_vs_hf >= 1).\n",
          markdown_table(rows, ["model", "batch", "new_tokens", "median_ms", "tokens_per_s", "speedup_vs_hf"])]
    write_results(args.name, {"machine": info, "rows": rows, "rounds": rounds, "quick": args.quick,
                              "prompt_len": args.prompt_len, "max_seq_len": cfg.model.max_seq_len}, "\n".join(md))


if __name__ == "__main__":
    main()

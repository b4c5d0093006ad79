"""Imported Hugging Face MoE models vs the same HF model: forward and forward+backward, import/export time.

Run: ``python benchmarks/hf_interop.py`` (full; on quiet cores), ``--quick`` for a smoke test.

1. Speed: a Mixtral-shaped and a DeepSeek-V3-shaped random model are built with ``transformers``,
   saved, and imported with ``moelab.hf.from_pretrained`` (same weights). Each HF experts
   implementation that runs on the device (``eager``, ``batched_mm``, ``grouped_mm``) is timed; the
   fastest is the reference. Forward (no grad) and forward+backward (sum of logits) of the imported
   model and of every HF variant are timed in interleaved rounds (``common.time_interleaved``);
   medians are reported with ``moelab / fastest HF`` ratios. ``batched_mm`` gathers one full copy of
   the expert weights per (token, expert) slot (``gate_up_proj[expert_ids]``: S x 3 x D x F floats per
   layer; measured: Mixtral full shapes, 1 x 64 tokens, forward: +799 MiB peak RSS vs +48 MiB for
   ``grouped_mm``), which is ~13 GB per layer at the full shapes; an implementation whose estimated
   gathered-weight memory (``gathered_weight_bytes``) exceeds ``--mem-cap-gib`` is skipped, and the
   reason is printed and recorded in the results (``skipped``).
2. Import / export time of a ~100M-parameter random Mixtral-shaped model: ``moelab hf import`` (folder
   -> run directory) and ``moelab hf export`` (run -> HF folder), wall-clock, each in a fresh process
   (first call, then a second one), with that process's peak RSS (``VmHWM``).

Results: ``benchmarks/results/hf_interop{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import Case, machine_info, markdown_table, time_interleaved, median, write_results  # noqa: E402

IMPLS = ("eager", "batched_mm", "grouped_mm")


def shapes(quick: bool) -> dict[str, dict]:
    if quick:
        mix = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
        ds = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                  n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        return {"mixtral": mix, "deepseek_v3": ds, "_batch": (2, 32), "_vocab": 512}
    mix = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
               intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)
    ds = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
              intermediate_size=1536, moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4,
              n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=128,
              kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32)
    return {"mixtral": mix, "deepseek_v3": ds, "_batch": (4, 256), "_vocab": 8192}


def hf_config(tf, family: str, kw: dict, vocab: int, max_pos: int):
    cls = {"mixtral": tf.MixtralConfig, "deepseek_v3": tf.DeepseekV3Config}[family]
    return cls(vocab_size=vocab, max_position_embeddings=max_pos, tie_word_embeddings=False, **kw)


def gathered_weight_bytes(model, tokens: int, backward: bool) -> int:
    """Peak bytes ``batched_mm`` spends on gathered expert weights: each MoE layer gathers
    ``gate_up_proj[e]`` and ``down_proj[e]`` for every one of its ``tokens * k`` slots; without grad
    one layer's copies are live at a time, with backward every layer's (saved by ``bmm``) plus
    their gradients."""
    k = int(getattr(model.config, "num_experts_per_tok", 1))
    per_layer = [tokens * k * sum(m.get_parameter(n)[0].numel() * m.get_parameter(n).element_size()
                                  for n in ("gate_up_proj", "down_proj"))
                 for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    if not per_layer:
        return 0
    return 2 * sum(per_layer) if backward else max(per_layer)


def too_big(impl: str, base, tokens: int, cap_gib: float) -> str | None:
    """Why ``impl`` is skipped (its gathered-weight memory over the cap), or None."""
    if impl != "batched_mm":
        return None
    need = gathered_weight_bytes(base, tokens, backward=True) / 2**30
    if need <= cap_gib:
        return None
    return (f"batched_mm gathers one expert-weight copy per (token, expert) slot: ~{need:.1f} GiB for "
            f"fwd+bwd at {tokens} tokens (forward {gathered_weight_bytes(base, tokens, False) / 2**30:.1f} GiB) "
            f"> --mem-cap-gib {cap_gib:g}")


def build_models(tf, family: str, cfg, folder: Path, device: str, tokens: int, cap_gib: float):
    """``{impl: HF model}`` for every experts implementation that runs and fits, ``{impl: why
    skipped}``, and the imported model."""
    from moelab.hf import from_pretrained

    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(cfg)
    base.save_pretrained(str(folder))
    hf, skipped = {}, {}
    for impl in IMPLS:
        why = too_big(impl, base, tokens, cap_gib)
        if why:
            print(f"  {family}: skipping experts_implementation={impl!r}: {why}")
            skipped[impl] = why
            continue
        try:
            m = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, experts_implementation=impl)
            hf[impl] = m.to(device)
        except Exception as e:  # noqa: BLE001 - an implementation this device/torch lacks
            skipped[impl] = f"unavailable: {str(e).splitlines()[0][:100]}"
            print(f"  {family}: experts_implementation={impl!r} {skipped[impl]}")
    del base
    return hf, skipped, from_pretrained(folder).to(device)


def _fwd(model, ids, moelab: bool):
    def run():
        with torch.no_grad():
            return model(ids).logits if moelab else model(input_ids=ids).logits
    return run


def _fwd_bwd(model, ids, moelab: bool):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids).logits if moelab else model(input_ids=ids).logits
        out.float().sum().backward()
    return run


def check_equal(hf: dict, ours, ids) -> float:
    with torch.no_grad():
        ref = next(iter(hf.values()))(input_ids=ids).logits
        return float((ours(ids).logits - ref).abs().max())


def speed(tf, family: str, kw: dict, batch: tuple[int, int], vocab: int, rounds: int, device: str,
          cap_gib: float) -> tuple[list[dict], dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        hf, skipped, ours = build_models(tf, family, hf_config(tf, family, kw, vocab, batch[1]), Path(tmp), device,
                                         batch[0] * batch[1], cap_gib)
    ids = torch.randint(0, vocab, batch, device=device)
    diff = check_equal(hf, ours, ids)
    rows = []
    for mode, make in (("forward", _fwd), ("fwd+bwd", _fwd_bwd)):
        for m in [*hf.values(), ours]:
            m.train(mode == "fwd+bwd")
        cases = [Case(f"hf:{impl}", make(m, ids, False)) for impl, m in hf.items()] + [Case("moelab", make(ours, ids, True))]
        t = time_interleaved(cases, rounds=rounds, warmup=1, device=device)
        med = {c.name: median(t[c.name]) for c in cases}
        best = min((k for k in med if k.startswith("hf:")), key=med.get)
        for name, ms in med.items():
            rows.append({"model": family, "mode": mode, "impl": name, "median_ms": ms,
                         "vs_fastest_hf": ms / med[best], "fastest_hf": best, "max_abs_logit_diff": diff})
    return rows, skipped


def import_export_time(tf, quick: bool) -> dict:
    """Build and save the random model here; import and export each run in a fresh process (spawn)
    so that its peak RSS (``VmHWM``) is its own: ``*_peak_rss_mib`` is the child's peak,
    ``*_base_rss_mib`` its peak before the call (Python, torch, transformers, moelab imported)."""
    kw = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, num_local_experts=4, num_experts_per_tok=2) if quick else
          dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4,
               intermediate_size=768, num_local_experts=8, num_experts_per_tok=2))
    vocab = 512 if quick else 8192
    cfg = tf.MixtralConfig(vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
                           eos_token_id=2, bos_token_id=1, pad_token_id=0, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        m = tf.AutoModelForCausalLM.from_config(cfg)
        n_params = sum(p.numel() for p in m.parameters())
        m.save_pretrained(str(tmp / "src"))
        _tokenizer(tf).save_pretrained(str(tmp / "src"))
        del m
        imp = _in_child("import", tmp / "src", tmp / "run")
        exp = _in_child("export", tmp / "run", tmp / "out")
    return {"params": n_params, "weights_mib": n_params * 4 / 2**20, "import_s": imp["s"], "export_s": exp["s"],
            "import_cold_s": imp["cold"], "export_cold_s": exp["cold"],
            "import_peak_rss_mib": imp["peak"], "import_base_rss_mib": imp["base"],
            "export_peak_rss_mib": exp["peak"], "export_base_rss_mib": exp["base"]}


def _in_child(what: str, src: Path, dst: Path) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_timed_call, what, str(src), str(dst), torch.get_num_threads()).result()


def _timed_call(what: str, src: str, dst: str, threads: int) -> dict:
    """Runs in the child: the import or export twice (``cold``: the first call of a fresh process,
    which also imports transformers' model classes; ``s``: the second), and the peak RSS (MiB)."""
    from moelab.hf import export_run, import_to_run
    from moelab.models.hf.convert import transformers_offline

    transformers_offline().logging.set_verbosity_error()
    torch.set_num_threads(threads)
    fn = import_to_run if what == "import" else export_run
    base, t0 = _max_rss_mib(), time.perf_counter()
    fn(Path(src), Path(dst))
    t1 = time.perf_counter()
    peak = _max_rss_mib()
    fn(Path(src), Path(dst + "_again"))
    return {"cold": t1 - t0, "s": time.perf_counter() - t1, "peak": peak, "base": base}


def _max_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM`` of /proc/self/status (the high-water mark of its own
    address space; ``ru_maxrss`` of a spawned child also counts the parent's RSS at fork time)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tokenizer(tf):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox"] * 10, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _skipped_md(skipped: dict[str, dict[str, str]]) -> str:
    lines = [f"- {fam} `{impl}`: {why}" for fam, d in skipped.items() for impl, why in d.items()]
    return "\nNot timed:\n\n" + "\n".join(lines) + "\n" if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; quick 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--note", default="", help="a line written under the title (e.g. 'under load')")
    ap.add_argument("--mem-cap-gib", type=float, default=4.0,
                    help="skip an HF experts implementation whose gathered expert weights would exceed this (GiB)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from moelab.models.hf.convert import transformers_offline

    tf = transformers_offline()
    tf.logging.set_verbosity_error()
    sh = shapes(args.quick)
    rounds = args.rounds or (2 if args.quick else 7)
    rows, skipped = [], {}
    for family in ("mixtral", "deepseek_v3"):
        r, skipped[family] = speed(tf, family, sh[family], sh["_batch"], sh["_vocab"], rounds, args.device,
                                   args.mem_cap_gib)
        rows += r
    io = import_export_time(tf, args.quick)
    cols = ["model", "mode", "impl", "median_ms", "vs_fastest_hf", "fastest_hf", "max_abs_logit_diff"]
    md = (f"# hf_interop{' (quick)' if args.quick else ''}\n\n" + (f"{args.note}\n\n" if args.note else "") +
          f"batch x seq = {sh['_batch']}, device {args.device}, "
          f"{rounds} interleaved rounds (medians)\n\n" + markdown_table(rows, cols) +
          f"\n\nImport / export of a {io['params'] / 1e6:.1f}M-parameter Mixtral-shaped random model: "
          f"import {io['import_s']:.1f} s, export {io['export_s']:.1f} s (first call of a fresh process, with "
          f"transformers' imports: {io['import_cold_s']:.1f} s, {io['export_cold_s']:.1f} s); peak RSS (one process each): import "
          f"{io['import_peak_rss_mib']:.0f} MiB (after imports {io['import_base_rss_mib']:.0f}), export "
          f"{io['export_peak_rss_mib']:.0f} MiB (after imports {io['export_base_rss_mib']:.0f}); "
          f"fp32 weights {io['weights_mib']:.0f} MiB\n" + _skipped_md(skipped))
    print(md)
    name = "hf_interop_quick" if args.quick else "hf_interop"
    write_results(name, {"machine": machine_info(args.device), "rows": rows, "import_export": io,
                         "batch": sh["_batch"], "rounds": rounds, "skipped": skipped,
                         "mem_cap_gib": args.mem_cap_gib, "note": args.note}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

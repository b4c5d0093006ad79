"""Evidence for the training recipes (issue 16), small and fast, on the embedded corpus.

Three claims, each a handful of short runs of a "mini" model (d=96, 3 layers, seq 64, batch 16;
the `tiny` preset is too slow on the shared CPU):

A. Expert Upcycling (Dwivedi et al. 2026): an E=4 model trained S steps, grown to E=8 (k=2 fixed) and
   continued S steps, matches an E=8 model trained 2S steps from scratch (same total tokens) and beats
   continuing the E=4 model S more steps. Both grow modes (copy = the paper, phased = exact at step 0).
B. Sparse upcycling (Komatsuzaki et al. 2023): a dense model trained S steps, upcycled to E=8 and
   continued S steps, beats continuing the dense model S steps.
C. MixLoRA vs LoRA (Li et al. 2024): on a prose-only dense base, fine-tuned on code, MixLoRA (E=4, r=R/4)
   reaches a lower code perplexity than a plain LoRA of rank R (about the same trainable parameters);
   trainable params and peak memory (one training step, CPU allocator, benchmarks/common.py) in the table.

Every continued run uses `train(..., init_from=...)` (fresh optimizer, warmup + cosine). Seeds: train.seed
and data.seed given by --seeds. Writes benchmarks/results/recipes.{json,md}.

    python benchmarks/recipes_evidence.py --steps 100 --seeds 0 1 2   # what benchmarks/results/recipes.md reports
    python benchmarks/recipes_evidence.py            # S=300, R=8, seed 0
    python benchmarks/recipes_evidence.py --quick    # S=20: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, peak_memory_mib, write_results  # noqa: E402

from moelab.data.corpus import DataConfig, load_corpus  # noqa: E402
from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.models.config import ModelConfig  # noqa: E402
from moelab.ops.lora import AdapterConfig  # noqa: E402
from moelab.ops.lora.finetune import finetune  # noqa: E402
from moelab.ops.upcycle.runs import make_options, upcycle_run  # noqa: E402
from moelab.train.config import RunConfig, TrainConfig  # noqa: E402
from moelab.train.run import load_config, load_run  # noqa: E402
from moelab.train.trainer import train  # noqa: E402


def mini(data: DataConfig, steps: int, seed: int, moe_layers="all", E=4) -> RunConfig:
    d = 96
    return RunConfig(
        model=ModelConfig(vocab_size=2048, d_model=d, n_layers=3, n_heads=3, max_seq_len=64, d_ff_dense=4 * d,
                          moe=MoEConfig(d_model=d, d_ff=2 * d, num_experts=E, k=2, dispatch="sorted"),
                          moe_layers=moe_layers),
        data=data,
        train=TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=max(2, steps // 20), eval_max_batches=8,
                          ckpt_every=0, log_every=50, seed=seed, threads=1),
    )


def val(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {"val_loss": s["val_loss"], **{f"{d}_loss": v["loss"] for d, v in s["per_domain"].items()}}


def step0_val_loss(run: Path) -> float:
    """Validation loss of a run directory's newest weights (an upcycled run at step 0)."""
    from moelab.data.pipeline import prepare_data
    from moelab.train.trainer import evaluate

    r = load_run(run)
    data = prepare_data(r.config.data)
    return evaluate(r.model, data.tokens["val"], r.tokenizer, data.splits.domains, seq_len=r.config.data.seq_len,
                    batch_size=16, max_batches=r.config.train.eval_max_batches)["val_loss"]


def cont(src: Path, out: Path, steps: int) -> Path:
    cfg = load_config(src)
    cfg.train.steps, cfg.train.warmup_steps = steps, max(2, steps // 20)
    train(cfg, out, overwrite=True, progress="off", init_from=src)
    return out


def claim_a(root: Path, data: DataConfig, S: int, seed: int) -> list[dict]:
    e4 = root / f"A_e4_s{seed}"
    train(mini(data, S, seed, E=4), e4, overwrite=True, progress="off")
    rows = [{"run": f"E=4, {S} steps (source)", "step0_val_loss": step0_val_loss(e4), **val(e4)}]
    for mode in ("copy", "phased"):
        g = upcycle_run(e4, "grow", make_options("grow", factor=2, mode=mode, utility=True), root / f"A_grow_{mode}_s{seed}",
                        overwrite=True)
        rows.append({"run": f"grow {mode} E=4->8 + {S} steps", "step0_val_loss": step0_val_loss(g),
                     **val(cont(g, root / f"A_grow_{mode}_cont_s{seed}", S))})
    e4c = cont(e4, root / f"A_e4_cont_s{seed}", S)
    rows.append({"run": f"E=4 continued {S} steps", "step0_val_loss": float("nan"), **val(e4c)})
    e8 = root / f"A_e8_scratch_s{seed}"
    train(mini(data, 2 * S, seed, E=8), e8, overwrite=True, progress="off")
    rows.append({"run": f"E=8 from scratch, {2 * S} steps", "step0_val_loss": float("nan"), **val(e8)})
    return rows


def claim_b(root: Path, data: DataConfig, S: int, seed: int) -> list[dict]:
    dense = root / f"B_dense_s{seed}"
    train(mini(data, S, seed, moe_layers="none"), dense, overwrite=True, progress="off")
    rows = [{"run": f"dense, {S} steps (source)", "step0_val_loss": step0_val_loss(dense), **val(dense)}]
    up = upcycle_run(dense, "sparse", make_options("sparse", num_experts=8, k=2), root / f"B_up_s{seed}", overwrite=True)
    rows.append({"run": f"sparse upcycle E=8 k=2 + {S} steps", "step0_val_loss": step0_val_loss(up),
                 **val(cont(up, root / f"B_up_cont_s{seed}", S))})
    dc = cont(dense, root / f"B_dense_cont_s{seed}", S)
    rows.append({"run": f"dense continued {S} steps", "step0_val_loss": float("nan"), **val(dc)})
    return rows


def write_domain_folders(root: Path, data: DataConfig) -> dict[str, Path]:
    """The embedded corpus as one folder per domain (prose-only base, code-only fine-tuning)."""
    splits = load_corpus(data)
    out = {}
    for dom in ("prose", "code"):
        folder = root / f"only_{dom}" / dom
        folder.mkdir(parents=True, exist_ok=True)
        for i, doc in enumerate(d for s in (splits.train, splits.val, splits.test) for d in s if d.domain == dom):
            (folder / f"{i:05d}.txt").write_text(doc.text)
        out[dom] = folder.parent
    return out


def step_memory_mib(run: Path, cfg: AdapterConfig) -> float:
    from moelab.ops.lora import add_adapters

    model = add_adapters(load_run(run).model, cfg)
    ids = torch.randint(0, model.cfg.vocab_size, (16, 64))

    def step():
        model(ids, labels_BL=ids).lm_loss.backward()
        model.zero_grad(set_to_none=True)
    step()
    return peak_memory_mib(step)


def claim_c(root: Path, data: DataConfig, S: int, R: int, seed: int, folders: dict[str, Path]) -> list[dict]:
    base_data = copy.deepcopy(data)
    base_data.source, base_data.max_chars_per_domain = str(folders["prose"]), None
    base = root / f"C_prose_base_s{seed}"
    train(mini(base_data, S, seed, moe_layers="none"), base, overwrite=True, progress="off")
    rows = []
    steps = max(10, S // 2)
    for name, cfg in (("lora", AdapterConfig(adapter="lora", rank=R, seed=seed)),
                      ("mixlora", AdapterConfig(adapter="mixlora", rank=max(1, R // 4), experts=4, k=2, seed=seed))):
        t0 = time.perf_counter()
        s = finetune(base, cfg, root / f"C_{name}_s{seed}",
                     [f"--data.source={folders['code']}", f"--train.steps={steps}", "--train.lr=3e-3",
                      f"--train.warmup_steps={max(2, steps // 20)}", "--train.weight_decay=0.0"],
                     overwrite=True, progress="off")
        rows.append({"run": f"{name} r={cfg.rank}" + (f" E={cfg.experts} k={cfg.k}" if name != "lora" else ""),
                     "code_ppl_before": s["val_before"]["per_domain"]["code"]["ppl"],
                     "code_ppl_after": s["val_after"]["per_domain"]["code"]["ppl"],
                     "trainable_params": s["trainable_params"], "step_peak_mib": step_memory_mib(base, cfg),
                     "tokens_per_s": s["tokens_per_s"], "wall_s": time.perf_counter() - t0})
    return rows


def mean_rows(per_seed: list[list[dict]]) -> list[dict]:
    out = []
    for rows in zip(*per_seed):
        r = {"run": rows[0]["run"]}
        for k, v in rows[0].items():
            if isinstance(v, float):
                vals = [row[k] for row in rows]
                r[k] = statistics.mean(vals)
                if len(vals) > 1:
                    r[k + "_sd"] = statistics.stdev(vals)
            elif k != "run":
                r[k] = v
        out.append(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S=20 steps, small corpus: check the script works")
    ap.add_argument("--steps", type=int, default=300, help="S (default 300)")
    ap.add_argument("--rank", type=int, default=8, help="plain LoRA rank R (MixLoRA: 4 experts of R/4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--claims", default="ABC")
    ap.add_argument("--root", default="/tmp/moelab_recipes_evidence")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    S = 20 if args.quick else args.steps
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    data = DataConfig(vocab_size=2048, seq_len=64, max_chars_per_domain=150_000 if args.quick else 600_000,
                      tokenizer_train_chars=400_000, cache_dir=str(root / "cache"))
    results: dict = {"S": S, "R": args.rank, "seeds": args.seeds, "machine": machine_info(), "claims": {}}
    folders = write_domain_folders(root, data) if "C" in args.claims else {}
    for c, fn in (("A", claim_a), ("B", claim_b), ("C", claim_c)):
        if c not in args.claims:
            continue
        per_seed = [fn(root, data, S, args.rank, s, folders) if c == "C" else fn(root, data, S, s) for s in args.seeds]
        results["claims"][c] = {"per_seed": per_seed, "mean": mean_rows(per_seed)}
        print(c, json.dumps(results["claims"][c]["mean"], indent=1), flush=True)
    md = [f"S={S} steps, seeds {args.seeds}, mini model (d=96, 3 layers, seq 64, batch 16), one thread.\n"]
    for c, r in results["claims"].items():
        cols = [k for k in r["mean"][0] if k != "run"]
        md.append(f"### Claim {c}\n\n" + markdown_table(r["mean"], ["run", *cols]))
    write_results("recipes_evidence" + ("_quick" if args.quick else ""), results, "\n\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

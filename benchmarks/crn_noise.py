"""Why common random numbers narrow a sweep's intervals only a little: the noise floor of one run.

Run: ``python benchmarks/crn_noise.py SWEEP_DIR [--config vanilla] [--seed 0] [--out runs/crn-noise]``
(SWEEP_DIR: a finished sweep, e.g. ``runs/reproduce/unipool`` from ``moelab reproduce unipool``).

A paired comparison removes what the runs of a seed share (initial weights, data order). What it
cannot remove is (a) the chaotic divergence of training: how far the final val loss moves under a
perturbation too small to matter, and (b) the seed x configuration interaction: how differently two
configurations respond to the same initialisation. This script measures (a) on one run of the sweep:
it re-trains ``CONFIG`` seed ``SEED`` with its exact config and common initial weights

* ``same``: unchanged (must reproduce the sweep's run bit for bit: the training is deterministic);
* ``one-weight-1e-6``: one embedding weight multiplied by 1 + 1e-6;
* ``embeddings-1e-3``: every embedding weight multiplied by 1 + 1e-3 N(0, 1);
* ``aux-coef+1%``: the aux-loss coefficient 1% larger,

and compares the spread of those final val losses with the sweep's own seed-to-seed and paired
spreads (per configuration: sample SD over seeds; per pair with the chosen configuration: SD of
the per-seed differences). Finished perturbation runs in ``--out`` are reused.
Results: ``benchmarks/results/crn_noise.{json,md}``. One thread per run (as sweep workers use).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import machine_info, markdown_table, write_results  # noqa: E402


def _perturb(kind: str):
    def hook(model):
        with torch.no_grad():
            w = model.embed.weight
            if kind == "one-weight-1e-6":
                w.view(-1)[123] *= 1 + 1e-6
            elif kind == "embeddings-1e-3":
                w.mul_(1 + 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    return hook


def perturbed_runs(sweep: Path, config: str, seed: int, out: Path) -> dict[str, float]:
    from moelab.sweep.crn import make_init_hook
    from moelab.train.config import RunConfig
    from moelab.train.trainer import train

    cfg_path = sweep / "configs" / f"{config}__seed{seed}.json"
    raw = json.loads(cfg_path.read_text())
    common = make_init_hook(cfg_path)
    losses = {}
    for kind in ("same", "one-weight-1e-6", "embeddings-1e-3", "aux-coef+1%"):
        done = out / kind / "summary.json"
        if not done.is_file():
            cfg = json.loads(json.dumps(raw))
            if kind == "aux-coef+1%":
                cfg["model"]["moe"]["aux_loss_coef"] *= 1.01
            extra = _perturb(kind)

            def hook(model, extra=extra):
                note = common(model)
                extra(model)
                return note
            train(RunConfig.from_dict(cfg), out / kind, overwrite=True, progress="log", init_hook=hook)
        losses[kind] = json.loads(done.read_text())["val_loss"]
    return losses


def sweep_spreads(sweep: Path, config: str) -> tuple[dict[str, dict[int, float]], list[dict]]:
    vals: dict[str, dict[int, float]] = {}
    for run in sorted((sweep / "runs").glob("*__seed*")):
        if (run / "summary.json").is_file():
            group, seed = run.name.rsplit("__seed", 1)
            vals.setdefault(group, {})[int(seed)] = json.loads((run / "summary.json").read_text())["val_loss"]
    rows = []
    for g, v in sorted(vals.items()):
        common = sorted(set(v) & set(vals[config]))
        diffs = [v[s] - vals[config][s] for s in common]
        rows.append({"configuration": g, "seeds": len(v),
                     "sd_over_seeds": statistics.stdev(v.values()) if len(v) > 1 else None,
                     f"sd_of_paired_diff_vs_{config}": statistics.stdev(diffs) if g != config and len(diffs) > 1 else None})
    return vals, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--config", default="vanilla")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/crn-noise"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    losses = perturbed_runs(args.sweep, args.config, args.seed, args.out)
    vals, rows = sweep_spreads(args.sweep, args.config)
    base = vals[args.config][args.seed]
    prow = [{"run": k, "val_loss": v, "minus_sweep_run": v - base} for k, v in losses.items()]
    moved = [abs(r["minus_sweep_run"]) for r in prow if r["run"] != "same"]
    md = (f"# crn_noise: the noise floor of one run vs the sweep's spreads\n\n"
          f"Sweep `{args.sweep}`, configuration `{args.config}` seed {args.seed} (val loss {base:.5f}) re-trained "
          f"with its own config and common initial weights, one thread.\n\n" + markdown_table([{"run": r["run"], "val_loss": f"{r['val_loss']:.5f}", "minus_sweep_run": f"{r['minus_sweep_run']:+.5f}"} for r in prow], ["run", "val_loss", "minus_sweep_run"]) +
          f"\n\nPerturbations too small to matter move the final val loss by {min(moved):.4f}-{max(moved):.4f}.\n\n"
          + markdown_table([{k: (f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else v)) for k, v in r.items()} for r in rows], list(rows[0])) + "\n")
    print(md)
    write_results("crn_noise", {"machine": machine_info("cpu"), "sweep": str(args.sweep), "config": args.config,
                                "seed": args.seed, "perturbations": prow, "spreads": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Arguments shared by `moelab prune | merge | skip | compress-compare` (calibration, budgets)."""

from __future__ import annotations

import argparse

from moelab.errors import MoelabError


def parse_keep(text: str) -> float | int:
    """``"0.5"`` -> 0.5 (a fraction), ``"4"`` -> 4 (an expert count); checked by the operation."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise MoelabError(f"--keep={text!r} is not valid; give a fraction in (0, 1] (e.g. 0.5) or an expert count") from None


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (default: a seeded, domain-balanced sample of the run's training split)")
    g.add_argument("--calib-tokens", type=int, default=16384, help="tokens in the calibration sample (default 16384)")
    g.add_argument("--calib-split", default="train", help="split of the run's corpus to sample (train, val, test)")
    g.add_argument("--calib-domain", default=None, help="sample only this domain (domain-specific pruning, EASY-EP)")
    g.add_argument("--calib-file", default=None, help="calibrate on this text file instead (e.g. a target-domain sample)")
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the sample")
    g.add_argument("--calib-batch-size", type=int, default=8, help="windows per forward")
    g.add_argument("--sample-tokens", type=int, default=512, help="tokens kept for merging (expert outputs on them)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def calibration_config(args: argparse.Namespace):
    from moelab.ops.calibrate import CalibrationConfig

    return CalibrationConfig(tokens=args.calib_tokens, split=args.calib_split, seed=args.calib_seed,
                             batch_size=args.calib_batch_size, sample_tokens=args.sample_tokens, domain=args.calib_domain,
                             progress=not args.no_progress).validate()


def add_io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="source run directory (read only)")
    p.add_argument("--out", required=True, help="output run directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of the source (default: newest)")


def report(manifest: dict, out: str) -> None:
    b, a = manifest["before"], manifest["after"]
    print(f"{manifest['op']} {manifest.get('criterion') or manifest.get('method')}: experts {b['experts']} -> "
          f"{a['experts']}; params {b['total']:,} -> {a['total']:,} (active {b['active']:,} -> {a['active']:,})")
    print(f"wrote {out} (manifest: {out}/ops_manifest.json)")

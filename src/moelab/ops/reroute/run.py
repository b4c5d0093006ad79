"""Command-level glue: load a run, make reference and evaluation samples, compare methods, write tables."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError, check_range

SPLITS = ("train", "val", "test")


def load_docs(run, source: str):
    """Documents of ``source``: a split of the run's own corpus (train/val/test) or a data source path."""
    from moelab.data.corpus import load_corpus

    if source in SPLITS:
        return load_corpus(run.config.data).split(source)
    if not Path(source).exists():
        raise MoelabError(f"data source {source!r} is neither a split ({', '.join(SPLITS)}) nor an existing path")
    splits = load_corpus(replace(run.config.data, source=source, val_fraction=0.0, test_fraction=0.0))
    return splits.train


def make_samples(run, source: str, *, domain: str | None, limit: int, seq_len: int | None = None) -> list:
    from moelab.ops.reroute.samples import describe, windows

    check_range("limit", limit, low=1)
    L = seq_len or run.config.data.seq_len
    docs = load_docs(run, source)
    domains = [domain] if domain else sorted({d.domain for d in docs})
    out = []
    for d in domains:
        out += windows(docs, run.tokenizer, L, domain=d, limit=limit)
    if not out:
        raise MoelabError(f"{source!r} gives no full window of {L} tokens" + (f" in domain {domain!r}" if domain else ""))
    return describe(run.model, out)


def compare(run, methods: dict[str, Any], refs, evals, *, layers: list[int] | None, target: str | None,
            progress: bool = True) -> tuple[list, str]:
    """Score the unmodified model and each method on ``evals``; returns (results, markdown table)."""
    from tqdm import tqdm

    from moelab.ops.reroute.evaluate import score, table
    from moelab.ops.reroute.offsets import gated_sites

    sites = gated_sites(run.model, layers, "re-routing")
    bar = tqdm(total=len(evals) * (1 + len(methods)), desc="re-routing", disable=not progress, leave=False)
    results = [score(run.model, sites, evals, "unmodified", bar=bar)]
    for name, m in methods.items():
        results.append(score(run.model, sites, evals, name, m, refs, bar=bar))
    bar.close()
    return results, table(results, target)


def write(out_dir: str | Path | None, stem: str, results, md: str, meta: dict[str, Any]) -> None:
    from moelab.ops.reroute.evaluate import to_dict

    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": to_dict(results)}, indent=1))
    (out / f"{stem}.md").write_text(md + "\n")

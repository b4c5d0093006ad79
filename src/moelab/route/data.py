"""Routing datasets: prompts × models score and cost matrices, loaders, splits.

Shapes: P prompts, M models. ``scores_PM`` in [0, 1] (correctness or a judge score),
``costs_PM`` in USD per prompt (given, or token usage × a price table).

Loaders read the file layouts of RouteLLM (lm-sys/RouteLLM, arXiv:2406.18665), RouterArena
(RouteWorks/RouterArena, arXiv:2510.00202), RouterBench (withmartian/routerbench,
arXiv:2403.12031) and a generic long format (prompt_id, model, score, cost). The package ships
no data: the shared files are located with :func:`find_shared_dir`.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError, check_choice, check_range

csv.field_size_limit(2**31 - 1)

# Published per-million-token prices (USD, input, output) at the time the answers were recorded.
# RouteLLM (arXiv:2406.18665, §5) prices GPT-4-1106-preview at OpenAI's $10/$30 and Mixtral-8x7B
# at the $0.24/$0.24 that Anyscale charged; RouterArena's prices are in its cost.json.
ROUTELLM_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.24, 0.24),
}
CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb; documented proxy when no tokenizer is given


def approx_tokens(text: str) -> int:
    """Token count proxy: ceil(len(text) / 4), at least 1."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _norm_text(t: str) -> str:
    return " ".join(t.split()).lower()


def prompt_hash(key: str) -> float:
    """Deterministic hash of a string to [0, 1)."""
    h = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


@dataclass
class RoutingDataset:
    """A routing dataset (see module docstring). ``texts`` may hold None for prompts without text."""

    name: str
    prompt_ids: list[str]
    texts: list[str | None]
    sources: list[str]
    categories: list[str]
    models: list[str]
    scores_PM: np.ndarray
    costs_PM: np.ndarray
    responses: dict[str, list[str]] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores_PM = np.asarray(self.scores_PM, dtype=np.float64)
        self.costs_PM = np.asarray(self.costs_PM, dtype=np.float64)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        P, M = len(self.prompt_ids), len(self.models)
        if M == 0:
            raise MoelabError(f"dataset {self.name!r}: models is empty; expected at least one model")
        if len(set(self.models)) != M:
            raise MoelabError(f"dataset {self.name!r}: duplicate model names in {self.models}")
        for nm, arr in (("scores_PM", self.scores_PM), ("costs_PM", self.costs_PM)):
            if arr.shape != (P, M):
                raise MoelabError(f"dataset {self.name!r}: {nm} has shape {arr.shape}; expected {(P, M)}")
        for nm, lst in (("texts", self.texts), ("sources", self.sources), ("categories", self.categories)):
            if len(lst) != P:
                raise MoelabError(f"dataset {self.name!r}: {nm} has {len(lst)} entries; expected {P}")
        if len(set(self.prompt_ids)) != P:
            raise MoelabError(f"dataset {self.name!r}: prompt_ids are not unique")
        bad = ~np.isfinite(self.scores_PM)
        if bad.any():
            p, m = np.argwhere(bad)[0]
            raise MoelabError(
                f"dataset {self.name!r}: score of model {self.models[m]!r} on prompt "
                f"{self.prompt_ids[p]!r} is {float(self.scores_PM[p, m])!r}; scores must be finite and in [0, 1]"
            )
        bad = (self.scores_PM < 0) | (self.scores_PM > 1)
        if bad.any():
            p, m = np.argwhere(bad)[0]
            raise MoelabError(
                f"dataset {self.name!r}: score={float(self.scores_PM[p, m])!r} of model {self.models[m]!r} on "
                f"prompt {self.prompt_ids[p]!r} is outside [0, 1]"
            )
        bad = ~np.isfinite(self.costs_PM) | (self.costs_PM < 0)
        if bad.any():
            p, m = np.argwhere(bad)[0]
            raise MoelabError(
                f"dataset {self.name!r}: cost={float(self.costs_PM[p, m])!r} of model {self.models[m]!r} on "
                f"prompt {self.prompt_ids[p]!r} is invalid; costs must be finite USD >= 0"
            )

    # ------------------------------------------------------------------ views
    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    def model_index(self, model: str) -> int:
        check_choice("model", model, self.models)
        return self.models.index(model)

    def subset(self, idx) -> "RoutingDataset":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda lst: [lst[i] for i in idx]  # noqa: E731
        resp = None if self.responses is None else {m: pick(v) for m, v in self.responses.items()}
        return RoutingDataset(
            self.name, pick(self.prompt_ids), pick(self.texts), pick(self.sources),
            pick(self.categories), list(self.models), self.scores_PM[idx], self.costs_PM[idx], resp,
            dict(self.meta),
        )

    def select_models(self, models: list[str]) -> "RoutingDataset":
        cols = [self.model_index(m) for m in models]
        resp = None if self.responses is None else {m: self.responses[m] for m in models if m in self.responses}
        return RoutingDataset(
            self.name, list(self.prompt_ids), list(self.texts), list(self.sources),
            list(self.categories), list(models), self.scores_PM[:, cols], self.costs_PM[:, cols], resp,
            dict(self.meta),
        )

    def deduplicate(self) -> "RoutingDataset":
        """Keep the first occurrence of each prompt text (whitespace/case-normalised) or id."""
        seen: set[str] = set()
        keep = []
        for i, (pid, t) in enumerate(zip(self.prompt_ids, self.texts)):
            key = _norm_text(t) if t else f"id:{pid}"
            if key not in seen:
                seen.add(key)
                keep.append(i)
        return self if len(keep) == self.n_prompts else self.subset(keep)

    def remove_prompts(self, texts: list[str]) -> "RoutingDataset":
        """Drop prompts whose normalised text is in ``texts`` (e.g. contaminated prompts)."""
        drop = {_norm_text(t) for t in texts}
        keep = [i for i, t in enumerate(self.texts) if not (t and _norm_text(t) in drop)]
        out = self.subset(keep)
        out.meta["removed_contaminated"] = self.n_prompts - len(keep)
        return out

    def split(
        self, test_frac: float = 0.3, val_frac: float = 0.0, group_by: str = "prompt", seed: int = 0
    ) -> tuple["RoutingDataset", ...]:
        """Deterministic split by hash of the prompt (or of its source/category with ``group_by``).

        Returns ``(train, test)``, or ``(train, val, test)`` when ``val_frac > 0``.
        """
        check_range("test_frac", test_frac, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_range("val_frac", val_frac, low=0.0, high=1.0 - test_frac, high_inclusive=False)
        check_choice("group_by", group_by, ["prompt", "source", "category"])
        keys = {"prompt": [t if t else f"id:{p}" for p, t in zip(self.prompt_ids, self.texts)],
                "source": self.sources, "category": self.categories}[group_by]
        u = np.array([prompt_hash(f"{seed}:{k}") for k in keys])
        test = np.flatnonzero(u < test_frac)
        val = np.flatnonzero((u >= test_frac) & (u < test_frac + val_frac))
        train = np.flatnonzero(u >= test_frac + val_frac)
        for nm, ix in (("train", train), ("test", test)):
            if len(ix) == 0:
                raise MoelabError(
                    f"split of {self.name!r} with group_by={group_by!r}, test_frac={test_frac} gives an "
                    f"empty {nm} split; use more prompts/groups or another fraction"
                )
        parts = [self.subset(train)] + ([self.subset(val)] if val_frac > 0 else []) + [self.subset(test)]
        return tuple(parts)

    def require_texts(self) -> list[str]:
        missing = [p for p, t in zip(self.prompt_ids, self.texts) if not t]
        if missing:
            raise MoelabError(
                f"dataset {self.name!r}: {len(missing)} prompts have no text (e.g. prompt_id="
                f"{missing[0]!r}); a text-feature router needs the prompt text"
            )
        return list(self.texts)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- prices
def token_cost(
    model: str, input_tokens: np.ndarray, output_tokens: np.ndarray, prices: dict
) -> np.ndarray:
    """USD = tokens × price per million. ``prices[model]`` is ``(in, out)`` or RouterArena's dict."""
    if model not in prices:
        raise MoelabError(
            f"model {model!r} is missing from the price table; add it (USD per million input/output "
            f"tokens). Known models: {', '.join(sorted(prices))}"
        )
    p = prices[model]
    if isinstance(p, dict):
        p = (p["input_token_price_per_million"], p["output_token_price_per_million"])
    p_in, p_out = float(p[0]), float(p[1])
    return (np.asarray(input_tokens, float) * p_in + np.asarray(output_tokens, float) * p_out) / 1e6


# ---------------------------------------------------------------------- shared data
def find_shared_dir() -> Path:
    """$MOELAB_SHARED, else ../shared from the repository root or the working directory."""
    cands = []
    if os.environ.get("MOELAB_SHARED"):
        cands.append(Path(os.environ["MOELAB_SHARED"]))
    cands.append(Path(__file__).resolve().parents[3].parent / "shared")
    cands.append(Path.cwd().parent / "shared")
    for c in cands:
        if (c / "data" / "llm-routing").is_dir():
            return c
    raise MoelabError(
        "shared data directory not found (looked in: " + ", ".join(map(str, cands)) +
        "); set MOELAB_SHARED to the folder holding data/llm-routing"
    )


def _truthy(v: str) -> float:
    s = str(v).strip().lower()
    if s in ("true", "1", "1.0", "yes"):
        return 1.0
    if s in ("false", "0", "0.0", "no"):
        return 0.0
    try:
        return float(s)
    except ValueError:
        raise MoelabError(f"score value {v!r} is neither a boolean nor a number") from None


def _contaminated(folder: Path) -> list[str]:
    f = folder / "contaminated_prompts.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(row.get("eval_prompt") or row.get("prompt") or "")
    return [t for t in out if t]


def load_routellm_mmlu(
    root: str | Path | None = None, prices: dict | None = None, output_tokens: int = 1,
    subjects: list[str] | None = None, drop_contaminated: bool = True,
) -> RoutingDataset:
    """RouteLLM MMLU (57 subject CSVs, True/False correctness for two models; category = subject).

    The files have no token usage, so cost = approx_tokens(prompt) × input price +
    ``output_tokens`` × output price (an answer letter: 1 token by default).
    """
    folder = Path(root) if root else find_shared_dir() / "data/llm-routing/routellm/mmlu"
    prices = prices or ROUTELLM_PRICES
    files = sorted(folder.glob("mmlu_*.csv"))
    if subjects is not None:
        files = [f for f in files if f.stem[len("mmlu_"):] in subjects]
    if not files:
        raise MoelabError(f"no mmlu_*.csv files in {folder}")
    ids, texts, cats, rows = [], [], [], []
    models: list[str] | None = None
    for f in files:
        subj = f.stem[len("mmlu_"):]
        with open(f, newline="") as fh:
            rd = csv.DictReader(fh)
            ms = [c for c in rd.fieldnames or [] if c != "prompt"]
            if models is None:
                models = ms
            for i, r in enumerate(rd):
                ids.append(f"mmlu/{subj}/{i}")
                texts.append(r["prompt"])
                cats.append(subj)
                rows.append([_truthy(r[m]) for m in models])
    assert models is not None
    in_tok = np.array([approx_tokens(t) for t in texts], float)
    costs = np.stack([token_cost(m, in_tok, np.full_like(in_tok, output_tokens), prices) for m in models], 1)
    ds = RoutingDataset("routellm-mmlu", ids, texts, ["mmlu"] * len(ids), cats, models,
                        np.array(rows), costs)
    ds = ds.deduplicate()
    return ds.remove_prompts(_contaminated(folder)) if drop_contaminated else ds


def load_routellm_gsm8k(
    root: str | Path | None = None, prices: dict | None = None, drop_contaminated: bool = True
) -> RoutingDataset:
    """RouteLLM GSM8K: correctness plus full responses; cost = prompt tokens × input price +
    response tokens × output price (tokens ≈ chars / 4)."""
    folder = Path(root) if root else find_shared_dir() / "data/llm-routing/routellm/gsm8k"
    prices = prices or ROUTELLM_PRICES
    with open(folder / "gsm8k_responses.csv", newline="") as fh:
        rd = csv.DictReader(fh)
        models = [c for c in rd.fieldnames or [] if c != "prompt" and not c.endswith("_response")]
        recs = list(rd)
    texts = [r["prompt"] for r in recs]
    in_tok = np.array([approx_tokens(t) for t in texts], float)
    responses = {m: [r[f"{m}_response"] for r in recs] for m in models}
    costs = np.stack([
        token_cost(m, in_tok, np.array([approx_tokens(x) for x in responses[m]], float), prices)
        for m in models], 1)
    scores = np.array([[_truthy(r[m]) for m in models] for r in recs])
    ids = [f"gsm8k/{i}" for i in range(len(recs))]
    ds = RoutingDataset("routellm-gsm8k", ids, texts, ["gsm8k"] * len(ids), ["gsm8k"] * len(ids),
                        models, scores, costs, responses)
    ds = ds.deduplicate()
    return ds.remove_prompts(_contaminated(folder)) if drop_contaminated else ds


def _lit(v):
    return v if isinstance(v, dict) else ast.literal_eval(v)


def load_routerarena(root: str | Path | None = None, prices: dict | None = None) -> RoutingDataset:
    """RouterArena ``sub_10`` answers (one JSONL per model) and ``cost.json`` prices.

    Prompt id = ``global_index``; source = its prefix before the first ``_``; category = the
    prefix before the last ``_``. Cost = token_usage × price. RouterArena's partial-credit scores
    contain one value slightly below 0 (-0.033); scores are clipped to [0, 1] and the number clipped
    is recorded in ``meta['clipped_scores']``.
    """
    folder = Path(root) if root else find_shared_dir() / "data/llm-routing/routerarena"
    if prices is None:
        prices = json.loads((folder / "cost.json").read_text())
    files = sorted(f for f in folder.glob("*.jsonl"))
    if not files:
        raise MoelabError(f"no <model>.jsonl files in {folder}")
    per_model: dict[str, dict[str, dict]] = {}
    for f in files:
        per_model[f.stem] = {}
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                per_model[f.stem][r["global_index"]] = r
    models = list(per_model)
    common = set.intersection(*(set(v) for v in per_model.values()))
    ids = [i for i in per_model[models[0]] if i in common]
    texts = [per_model[models[0]][i]["question"] for i in ids]
    scores = np.zeros((len(ids), len(models)))
    costs = np.zeros((len(ids), len(models)))
    for j, m in enumerate(models):
        tin, tout = [], []
        for k, i in enumerate(ids):
            r = per_model[m][i]
            scores[k, j] = float(_lit(r["evaluation_result"])["score"])
            tu = _lit(r["token_usage"])
            tin.append(tu["input_tokens"])
            tout.append(tu["output_tokens"])
        costs[:, j] = token_cost(m, np.array(tin), np.array(tout), prices)
    clipped = int(((scores < 0) | (scores > 1)).sum())
    scores = np.clip(scores, 0.0, 1.0)
    ds = RoutingDataset("routerarena", ids, texts, [i.split("_", 1)[0] for i in ids],
                        [i.rsplit("_", 1)[0] for i in ids], models, scores, costs,
                        {m: [per_model[m][i]["generated_answer"] for i in ids] for m in models},
                        {"clipped_scores": clipped})
    return ds.deduplicate()


_RB_META = {"sample_id", "prompt", "eval_name", "oracle_model_to_route_to", "split", "Unnamed: 0", ""}
PICKLE_SUFFIXES = (".pkl", ".pickle")


def _is_pickle(path: Path) -> bool:
    if path.suffix in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == b"\x80"  # pickle protocol 2+ opcode PROTO
    except OSError:
        return False


def read_pickle_checked(path: Path, allow_pickle: bool):
    """pandas.read_pickle behind an explicit opt-in: unpickling runs arbitrary code."""
    if not allow_pickle:
        raise MoelabError(
            f"{path} is a pickle; loading a pickle runs any code inside it, so it is refused by default. "
            "Convert it to CSV, Parquet or JSONL, or pass --allow-pickle (allow_pickle=True) for a file you trust"
        )
    import warnings

    import pandas as pd

    warnings.warn(f"loading pickle {path} (allow_pickle=True): this runs any code in the file", stacklevel=3)
    return pd.read_pickle(path)


def _read_table(path: Path, allow_pickle: bool = False) -> tuple[list[str], list[dict]]:
    """(columns, records) of a CSV, JSONL, Parquet or (opt-in) pickle file."""
    if _is_pickle(path):
        df = read_pickle_checked(path, allow_pickle)
        return [str(c) for c in df.columns], df.to_dict("records")
    if path.suffix == ".parquet":
        import pandas as pd

        df = pd.read_parquet(path)
        return [str(c) for c in df.columns], df.to_dict("records")
    if path.suffix in (".jsonl", ".json"):
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        cols = list(dict.fromkeys(k for r in recs for k in r))
        return cols, recs
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="") as fh:
            rd = csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ",")
            return list(rd.fieldnames or []), list(rd)
    raise MoelabError(
        f"data path {str(path)!r} has suffix {path.suffix!r}; expected .csv, .jsonl, .parquet (or .pkl with --allow-pickle)"
    )


def unwrap_prompt(v) -> str | None:
    """A prompt as text: RouterBench stores some prompts as Python list literals (``"['...']"``);
    those are unwrapped (several turns joined with a blank line)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (list, tuple)):
        return "\n\n".join(str(x) for x in v) or None
    s = str(v)
    if len(s) >= 2 and s[0] == "[" and s[-1] == "]":
        try:
            lit = ast.literal_eval(s)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return s or None
        if isinstance(lit, list) and all(isinstance(x, str) for x in lit):
            return "\n\n".join(lit) or None
    return s or None


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _rb_models(cols: list[str], where: str) -> list[str]:
    """Models of a RouterBench table; every model needs a score column and ``<model>|total_cost``."""
    colset = set(cols)
    named = list(dict.fromkeys(c.split("|", 1)[0] for c in cols if "|" in c))
    if not named:
        raise MoelabError(f"{where}: no '<model>|total_cost' or '<model>|model_response' columns; "
                          "not the RouterBench schema")
    for m in named:
        if f"{m}|total_cost" not in colset:
            raise MoelabError(f"{where}: model {m!r} has no cost column {m + '|total_cost'!r}; "
                              "every model needs one (or drop the model's columns)")
        if m not in colset:
            raise MoelabError(f"{where}: model {m!r} has a {m + '|total_cost'!r} column but no score column {m!r}")
    return named


def _merge_duplicates(recs: list[dict], models: list[str], where: str) -> list[dict]:
    """RouterBench repeats a ``sample_id`` on two rows with the scores split between them (and
    each row with its own costs): merge rows with the same id, taking each model's score, cost
    and response from the row where that model's score is filled in. Two different scores for one
    model are an error naming the id and the rows."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(str(r.get("sample_id", f"row{i}")), []).append(i)
    out = []
    for sid, rows in groups.items():
        merged = dict(recs[rows[0]])
        merged["_rows"] = rows
        for m in models if len(rows) > 1 else []:
            filled = [i for i in rows if not _blank(recs[i].get(m))]
            vals = {_num(recs[i][m], f"score of {m}", where, sid) for i in filled}
            if len(vals) > 1:
                raise MoelabError(f"{where}: sample_id={sid!r} appears on rows {rows} with different values of "
                                  f"{m!r} ({sorted(vals)}); cannot merge them")
            src = recs[filled[0]] if filled else merged
            for k in (m, f"{m}|total_cost", f"{m}|model_response"):
                if k in src:
                    merged[k] = src[k]
        out.append(merged)
    return out


def _num(v, what: str, where: str, sid: str) -> float:
    if isinstance(v, bool):
        return float(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if not math.isfinite(x):
        raise MoelabError(f"{where}: {what}={str(v)!r} on sample_id={sid!r} is not a number")
    return x


def _rb_files(path) -> list[Path]:
    if isinstance(path, (list, tuple)):
        return [Path(p) for p in path]
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".csv", ".jsonl", ".parquet", *PICKLE_SUFFIXES))
        if not files:
            raise MoelabError(f"folder {str(p)!r} holds no .csv/.jsonl/.parquet files of the RouterBench schema")
        return files
    return [p]


def load_routerbench(path, eval_name: str | None = None, allow_pickle: bool = False) -> RoutingDataset:
    """RouterBench schema (arXiv:2403.12031): one row per prompt, per model a score column,
    ``<model>|total_cost`` and ``<model>|model_response``; ``eval_name``; ``prompt``; optional
    ``sample_id``. ``path`` is a file, a folder of such files or a list of files (splits come as
    separate files; they are concatenated and must name the same models). CSV, JSONL or Parquet;
    a pandas pickle only with ``allow_pickle=True`` (unpickling runs code).

    Prompts stored as Python list literals are unwrapped; rows repeating a ``sample_id`` (RouterBench
    splits some prompts' scores over two rows) are merged, and conflicting duplicates are an error
    naming the id. A model without its ``|total_cost`` column is an error naming it."""
    files = _rb_files(path)
    recs: list[dict] = []
    models: list[str] | None = None
    for f in files:
        cols, rows = _read_table(f, allow_pickle)
        ms = _rb_models(cols, str(f))
        if models is not None and ms != models:
            raise MoelabError(f"{f}: models {ms} differ from {models} in {files[0]}; files must share the pool")
        models = ms
        recs += rows
    assert models is not None
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    if eval_name is not None:
        recs = [r for r in recs if str(r.get("eval_name")) == eval_name]
    if not recs:
        raise MoelabError(f"{where}: no rows" + (f" with eval_name={eval_name!r}" if eval_name else ""))
    recs = _merge_duplicates(recs, models, where)
    ids = [str(r.get("sample_id", f"row{r['_rows'][0]}")) for r in recs]
    texts = [unwrap_prompt(r.get("prompt")) for r in recs]
    evals = [str(r.get("eval_name", "unknown")) for r in recs]
    scores = np.array([[_num(r.get(m), f"score of {m}", where, s) for m in models] for r, s in zip(recs, ids)])
    costs = np.array([[_num(r.get(f"{m}|total_cost"), f"{m}|total_cost", where, s) for m in models]
                      for r, s in zip(recs, ids)])
    resp = None
    if all(f"{m}|model_response" in recs[0] for m in models):
        resp = {m: [str(r.get(f"{m}|model_response")) for r in recs] for m in models}
    src = [e.split(".")[0].split("-")[0] for e in evals]
    name = files[0].stem if len(files) == 1 else Path(files[0]).parent.name
    return RoutingDataset(name, ids, texts, src, evals, models, scores, costs, resp).deduplicate()


def load_long(path: str | Path, name: str | None = None) -> RoutingDataset:
    """Generic long format, one row per (prompt, model): ``prompt_id, model, score, cost`` and
    optional ``prompt`` (text), ``source``, ``category``. CSV, JSONL or Parquet.
    Every (prompt, model) pair must be present: nothing is filled in."""
    path = Path(path)
    _, recs = _read_table(path)
    for need in ("prompt_id", "model", "score", "cost"):
        if recs and need not in recs[0]:
            raise MoelabError(
                f"{path}: column {need!r} is missing; the long format needs prompt_id, model, score, cost, and "
                f"the RouterBench schema needs '<model>|total_cost' columns; found columns {list(recs[0])[:12]}")
    pids: list[str] = []
    models: list[str] = []
    info: dict[str, dict] = {}
    cell: dict[tuple[str, str], tuple[float, float]] = {}
    for r in recs:
        pid, m = str(r["prompt_id"]), str(r["model"])
        if pid not in info:
            pids.append(pid)
            info[pid] = r
        if m not in models:
            models.append(m)
        for k in ("score", "cost"):
            v = r[k]
            if v is None or (isinstance(v, str) and v.strip() == ""):
                raise MoelabError(f"{path}: {k} of model {m!r} on prompt {pid!r} is empty")
        cell[(pid, m)] = (float(r["score"]), float(r["cost"]))
    scores = np.full((len(pids), len(models)), np.nan)
    costs = np.full((len(pids), len(models)), np.nan)
    for i, p in enumerate(pids):
        for j, m in enumerate(models):
            if (p, m) not in cell:
                raise MoelabError(f"{path}: no row for model {m!r} on prompt {p!r}; every pair is required")
            scores[i, j], costs[i, j] = cell[(p, m)]

    def opt(p, k, default):
        v = info[p].get(k)
        return default if v is None or (isinstance(v, float) and math.isnan(v)) or v == "" else str(v)

    return RoutingDataset(
        name or path.stem, pids, [opt(p, "prompt", None) for p in pids],
        [opt(p, "source", "unknown") for p in pids], [opt(p, "category", "unknown") for p in pids],
        models, scores, costs,
    ).deduplicate()


DATASETS = ("routellm-mmlu", "routellm-gsm8k", "routerarena")


def _header(path: Path) -> list[str]:
    """Column names of a data file, read cheaply (first line of CSV/JSONL, schema of Parquet)."""
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="") as fh:
            return next(csv.reader(fh, delimiter="\t" if path.suffix == ".tsv" else ","), [])
    if path.suffix in (".jsonl", ".json"):
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    return list(json.loads(line))
        return []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return []


def load_dataset(name_or_path: str, max_prompts: int | None = None, allow_pickle: bool = False) -> RoutingDataset:
    """Load by CLI name (routellm-mmlu, routellm-gsm8k, routerarena), a file, a folder or a
    comma-separated list of files. RouterBench schema when the columns include ``<model>|...``
    (or the file is a pickle, read only with ``allow_pickle=True``), else the long format."""
    if name_or_path == "routellm-mmlu":
        ds = load_routellm_mmlu()
    elif name_or_path == "routellm-gsm8k":
        ds = load_routellm_gsm8k()
    elif name_or_path == "routerarena":
        ds = load_routerarena()
    else:
        parts = [Path(s) for s in str(name_or_path).split(",") if s.strip()]
        for p in parts:
            if not p.exists():
                raise MoelabError(f"data={str(p)!r} is neither a dataset name ({', '.join(DATASETS)}) "
                                  "nor an existing file or folder")
        files = _rb_files(parts[0]) if len(parts) == 1 else parts
        first = files[0]
        rb = _is_pickle(first) or any("|" in c for c in _header(first))
        if rb:
            ds = load_routerbench(files, allow_pickle=allow_pickle)
        elif len(files) == 1:
            ds = load_long(first)
        else:
            raise MoelabError(f"data={name_or_path!r}: several files are read only in the RouterBench schema "
                              f"('<model>|total_cost' columns); {first} has none")
    if max_prompts is not None and ds.n_prompts > max_prompts:
        order = np.argsort([prompt_hash(f"sub:{p}") for p in ds.prompt_ids], kind="stable")[:max_prompts]
        ds = ds.subset(np.sort(order))
    return ds

"""Routing traces: what every MoE layer decided for a fixed, seeded sample of evaluation tokens.

A :class:`Trace` holds, for one checkpoint, the traced tokens (ids, domain labels, sequence and
position, validity, per-token loss) and per MoE layer the routing in CSR form (``token_S``,
``expert_S``, ``weight_S``, optional ``keep_S``), the router probabilities ``probs_TE``, the hidden
states entering the layer ``hidden_TD`` (captured with a forward pre-hook) and the router's
direction matrix ``router_w_ED`` when the router has one. CSR storage makes variable-k routers
(top-p, null experts, expert choice) work without padding.

Traces are stored as one safetensors file (arrays) whose metadata carries the JSON header:
step, seed, the domain names, ``config_hash`` (hash of the run's model architecture config)
and ``weights_checksum`` (from the checkpoint's state.json), so that comparing a trace with a run
or with another trace from a different model raises a clear :class:`MoelabError`.

Shape legend: B batch, L sequence length, T = B*L tokens, E experts, S slots, D model dim.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import metrics as M
from moelab.errors import MoelabError, check_range

TRACE_FORMAT = 1
_CKPT_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------- data
@dataclass
class LayerTrace:
    """One MoE layer's routing of the traced tokens."""

    layer: int
    num_experts: int
    token_S: np.ndarray
    expert_S: np.ndarray
    weight_S: np.ndarray
    keep_S: np.ndarray | None = None
    probs_TE: np.ndarray | None = None
    hidden_TD: np.ndarray | None = None
    router_w_ED: np.ndarray | None = None

    def kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(token_S, expert_S, weight_S)`` of the slots that were computed (not dropped)."""
        return M.kept_slots(self.token_S, self.expert_S, self.weight_S, self.keep_S)

    def mask_TE(self, num_tokens: int) -> np.ndarray:
        t, e, _ = self.kept()
        return M.choice_mask(t, e, num_tokens, self.num_experts)


@dataclass
class Trace:
    """Routing of a fixed token sample through every MoE layer of one checkpoint."""

    token_ids_T: np.ndarray
    domain_T: np.ndarray
    seq_T: np.ndarray
    pos_T: np.ndarray
    valid_T: np.ndarray
    layers: list[LayerTrace]
    domains: list[str]
    loss_T: np.ndarray | None = None
    step: int | None = None
    seed: int = 0
    config_hash: str = ""
    weights_checksum: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.size)

    def layer(self, index: int) -> LayerTrace:
        for lt in self.layers:
            if lt.layer == index:
                return lt
        raise MoelabError(f"layer={index} is not a traced MoE layer; choose one of: {[l.layer for l in self.layers]}")

    # ------------------------------------------------------------- io
    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "token_ids_T": self.token_ids_T.astype(np.int64), "domain_T": self.domain_T.astype(np.int64),
            "seq_T": self.seq_T.astype(np.int64), "pos_T": self.pos_T.astype(np.int64),
            "valid_T": self.valid_T.astype(np.uint8),
        }
        if self.loss_T is not None:
            arrays["loss_T"] = self.loss_T.astype(np.float32)
        layers_meta = []
        for lt in self.layers:
            p = f"layer{lt.layer}."
            arrays[p + "token_S"] = lt.token_S.astype(np.int32)
            arrays[p + "expert_S"] = lt.expert_S.astype(np.int32)
            arrays[p + "weight_S"] = lt.weight_S.astype(np.float32)
            for name in ("keep_S", "probs_TE", "hidden_TD", "router_w_ED"):
                v = getattr(lt, name)
                if v is not None:
                    arrays[p + name] = v.astype(np.uint8) if name == "keep_S" else v.astype(np.float32)
            layers_meta.append({"layer": lt.layer, "num_experts": lt.num_experts})
        header = {
            "format": TRACE_FORMAT, "step": self.step, "seed": self.seed, "domains": self.domains,
            "config_hash": self.config_hash, "weights_checksum": self.weights_checksum,
            "layers": layers_meta, "meta": self.meta,
        }
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
                  metadata={"moelab_trace": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MoelabError(f"trace path={str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
            raise MoelabError(f"trace path={str(path)!r} is not a safetensors trace: {e}") from e
        if "moelab_trace" not in meta:
            raise MoelabError(f"trace path={str(path)!r} has no moelab_trace header (not a moelab trace)")
        h = json.loads(meta["moelab_trace"])
        if h.get("format") != TRACE_FORMAT:
            raise MoelabError(f"trace format={h.get('format')!r} is not supported; expected {TRACE_FORMAT}")
        layers = []
        for lm in h["layers"]:
            p = f"layer{lm['layer']}."
            g = lambda n: arrays.get(p + n)  # noqa: E731
            keep = g("keep_S")
            layers.append(LayerTrace(
                layer=int(lm["layer"]), num_experts=int(lm["num_experts"]),
                token_S=g("token_S").astype(np.int64), expert_S=g("expert_S").astype(np.int64),
                weight_S=g("weight_S"), keep_S=None if keep is None else keep.astype(bool),
                probs_TE=g("probs_TE"), hidden_TD=g("hidden_TD"), router_w_ED=g("router_w_ED"),
            ))
        return cls(
            token_ids_T=arrays["token_ids_T"], domain_T=arrays["domain_T"], seq_T=arrays["seq_T"],
            pos_T=arrays["pos_T"], valid_T=arrays["valid_T"].astype(bool), loss_T=arrays.get("loss_T"),
            layers=layers, domains=list(h["domains"]), step=h.get("step"), seed=int(h.get("seed", 0)),
            config_hash=h.get("config_hash", ""), weights_checksum=h.get("weights_checksum", ""),
            meta=h.get("meta", {}),
        )


# --------------------------------------------------------------------------- hashes / checks
def config_hash(config: dict[str, Any]) -> str:
    """Hash of the model architecture part of a run config (``model`` and ``moe`` sections, and the
    ``hf`` section of an imported Hugging Face run).

    Traces of two checkpoints of one run share it; a trace from a differently shaped model does
    not. Falls back to the whole config when it has no ``model`` section.
    """
    arch = {k: config[k] for k in ("model", "moe", "hf") if k in config} or config
    blob = json.dumps(arch, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_model(a: Trace, b: Trace) -> None:
    """Raise unless two traces come from the same model architecture and the same tokens."""
    if a.config_hash != b.config_hash:
        raise MoelabError(
            f"trace config_hash={b.config_hash!r} differs from {a.config_hash!r}: "
            "the traces come from different models"
        )
    if a.token_ids_T.shape != b.token_ids_T.shape or not np.array_equal(a.token_ids_T, b.token_ids_T):
        raise MoelabError("the traces cover different tokens; trace both with the same seed and num_windows")


def check_trace_matches_run(trace: Trace, run_config: dict[str, Any]) -> None:
    """Raise if ``trace`` was recorded from a model other than the run's."""
    h = config_hash(run_config)
    if trace.config_hash != h:
        raise MoelabError(
            f"trace config_hash={trace.config_hash!r} does not match the run's model (config_hash={h!r}): "
            "the trace was recorded from another model"
        )


# --------------------------------------------------------------------------- run directory
def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps of the run's checkpoints (``RUN/checkpoints/step_XXXXXX``), ascending.

    Raises MoelabError when the run directory or its checkpoints are missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MoelabError(f"run_dir={str(run_dir)!r} is not a directory")
    ck = run_dir / "checkpoints"
    steps = sorted(int(m.group(1)) for p in (ck.iterdir() if ck.is_dir() else [])
                   if (m := _CKPT_RE.match(p.name)) and (p / "model.safetensors").is_file())
    if not steps:
        raise MoelabError(
            f"run_dir={str(run_dir)!r} has no checkpoints (expected {ck}/step_XXXXXX/model.safetensors)"
        )
    return steps


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MoelabError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise MoelabError(f"{path} is not valid JSON: {e}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl file ([] if absent); a truncated last line (run still writing) is skipped."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise MoelabError(f"{path}:{i + 1} is not valid JSON") from None
    return out


def checkpoint_checksum(run_dir: Path, step: int) -> str:
    """sha256 of the checkpoint's model weights (from state.json, else computed from the file)."""
    d = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    if (d / "state.json").is_file():
        sha = read_json(d / "state.json").get("sha256")
        if isinstance(sha, dict) and sha.get("model.safetensors"):
            return str(sha["model.safetensors"])
        if isinstance(sha, str):
            return sha
    if (d / "model.safetensors").is_file():
        h = hashlib.sha256()
        with open(d / "model.safetensors", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return ""


# --------------------------------------------------------------------------- tracing a model
def _router_matrix(layer: Any, E: int, D: int) -> np.ndarray | None:
    """The router's direction of each expert in the hidden space, ``[E, D]``, or None.

    The single (E, D) or (D, E) parameter or buffer of ``layer.router`` (else of the layer's
    tensors whose name mentions "router"); a noise gate (noisy top-k) is not a direction and is
    skipped. K-means routers give their centroids (buffers). A router that projects before
    comparing with centroids (``proj_PD``, ``centroids_EP``: cosine routing) gives
    ``centroids_EP @ proj_PD``, the input direction that raises expert e's score most (choice: the
    cosine's normalisation by |P x| is ignored). None when ambiguous (several matrices) or absent.
    """
    router = getattr(layer, "router", None)
    if router is not None:
        named = list(router.named_parameters()) + list(router.named_buffers())
    else:
        named = [(n, p) for n, p in list(layer.named_parameters()) + list(layer.named_buffers()) if "router" in n]
    t = dict(named)
    proj, cent = t.get("proj_PD"), t.get("centroids_EP")
    if proj is not None and cent is not None and proj.shape[1] == D and cent.shape[0] == E:
        return (cent.detach().float() @ proj.detach().float()).cpu().numpy()
    cands = []
    for name, p in named:
        if not torch_is_2d(p) or "noise" in name:
            continue
        if tuple(p.shape) == (E, D):
            cands.append(p.detach().float().cpu().numpy())
        elif tuple(p.shape) == (D, E):
            cands.append(p.detach().float().cpu().numpy().T)
    return cands[0] if len(cands) == 1 else None


def torch_is_2d(p: Any) -> bool:
    return getattr(p, "ndim", 0) == 2 and p.is_floating_point()


def trace_model(model: Any, input_ids_BL: Any, domain_B: Any, domains: list[str], *,
                labels_BL: Any = None, valid_BL: Any = None, capture_hidden: bool = True,
                step: int | None = None, seed: int = 0, config_hash_: str = "",
                weights_checksum: str = "") -> Trace:
    """Run ``model`` once on the windows and read every MoE layer's ``last_routing``.

    ``model`` follows INTERFACES.md: ``model(input_ids_BL, labels_BL=..., valid_BL=...)`` returns an
    object with ``logits`` ``[B, L, V]``, and ``model.moe_layers()`` yields ``(index, MoELayer)``.
    Hidden states entering each MoE layer are captured with a forward pre-hook. The per-token loss
    is cross entropy of ``logits`` against ``labels_BL`` (default: the next token, last position
    invalid).
    """
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(input_ids_BL).long()
    if ids.ndim != 2:
        raise MoelabError(f"input_ids_BL must be 2-D [B, L], got shape {tuple(ids.shape)}")
    B, L = ids.shape
    if labels_BL is None:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
    else:
        labels = torch.as_tensor(labels_BL).long()
    valid = torch.ones_like(ids, dtype=torch.bool) if valid_BL is None else torch.as_tensor(valid_BL).bool()
    if not hasattr(model, "moe_layers"):
        raise MoelabError("model has no moe_layers(): tracing needs a moelab MoETransformer")
    moe = list(model.moe_layers())
    if not moe:
        raise MoelabError("model has no MoE layers to trace")
    hidden: dict[int, np.ndarray] = {}
    hooks = []
    if capture_hidden:
        for idx, layer in moe:
            def pre(mod, args, idx=idx):
                x = args[0]
                hidden[idx] = x.detach().reshape(-1, x.shape[-1]).float().cpu().numpy()
            hooks.append(layer.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(ids, labels_BL=labels, valid_BL=valid)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    logits = out.logits if hasattr(out, "logits") else out[0]
    lab = labels.clone()
    lab[~valid] = -100
    loss_T = F.cross_entropy(logits.float().reshape(B * L, -1), lab.reshape(-1), ignore_index=-100,
                             reduction="none").cpu().numpy()
    layers = []
    for idx, layer in moe:
        r = getattr(layer, "last_routing", None)
        if r is None:
            raise MoelabError(f"MoE layer {idx} has no last_routing after the forward pass")
        if r.num_tokens != B * L:
            raise MoelabError(f"MoE layer {idx} routed {r.num_tokens} tokens, expected B*L={B * L}")
        np_ = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        h = hidden.get(idx)
        layers.append(LayerTrace(
            layer=int(idx), num_experts=int(r.num_experts),
            token_S=np_(r.token_S).astype(np.int64), expert_S=np_(r.expert_S).astype(np.int64),
            weight_S=np_(r.weight_S.float()), keep_S=np_(r.keep_S),
            probs_TE=None if r.probs_TE is None else np_(r.probs_TE.float()),
            hidden_TD=h, router_w_ED=None if h is None else _router_matrix(layer, int(r.num_experts), h.shape[1]),
        ))
    dom = np.asarray(domain_B, dtype=np.int64)
    return Trace(
        token_ids_T=ids.reshape(-1).numpy(), domain_T=np.repeat(dom, L),
        seq_T=np.repeat(np.arange(B), L), pos_T=np.tile(np.arange(L), B),
        valid_T=valid.reshape(-1).numpy(), loss_T=loss_T, layers=layers, domains=list(domains),
        step=step, seed=seed, config_hash=config_hash_, weights_checksum=weights_checksum,
    )


def sample_windows(batches: Any, num_windows: int, seed: int) -> tuple[Any, Any, Any, np.ndarray]:
    """A seeded sample of ``num_windows`` evaluation windows, balanced across domains where possible.

    ``batches`` yields objects with ``input_ids_BL``, ``labels_BL``, ``valid_BL``, ``domain_B``
    (``moelab.data.loader.Batch``). Returns stacked ``(input_ids, labels, valid, domain)``.
    """
    import torch

    rows: list[tuple[Any, Any, Any, int]] = []
    for b in batches:
        dom = b.domain_B
        for i in range(b.input_ids_BL.shape[0]):
            d = dom[i]
            rows.append((b.input_ids_BL[i], b.labels_BL[i], b.valid_BL[i], int(d)))
    if not rows:
        raise MoelabError("the evaluation split produced no windows to trace")
    rng = np.random.default_rng(seed)
    by_dom: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_dom.setdefault(r[3], []).append(i)
    for v in by_dom.values():
        rng.shuffle(v)
    chosen: list[int] = []
    while len(chosen) < min(num_windows, len(rows)):  # round-robin over domains
        for d in sorted(by_dom):
            if by_dom[d] and len(chosen) < num_windows:
                chosen.append(by_dom[d].pop())
    chosen.sort()
    st = lambda j: torch.stack([torch.as_tensor(rows[i][j]) for i in chosen])  # noqa: E731
    return st(0), st(1), st(2), np.array([rows[i][3] for i in chosen])


def _domain_index(domains: list[str], d: Any) -> int:
    if isinstance(d, str):
        return domains.index(d) if d in domains else 0
    return int(d)


def trace_run(run_dir: str | Path, step: int | None = None, *, num_windows: int = 16, seed: int = 0,
              capture_hidden: bool = True, window_cache: dict | None = None) -> Trace:
    """Trace checkpoint ``step`` (default: the last) of a run on a seeded sample of validation windows.

    Uses ``moelab.train.run.load_run`` for the model and tokenizer and ``moelab.data`` for the
    validation split and its windows, so every checkpoint of a run is traced on the same tokens.
    ``window_cache`` (a dict the caller keeps) saves re-reading the corpus when tracing several
    checkpoints of one run.
    """
    run_dir = Path(run_dir)
    check_range("num_windows", num_windows, low=1)
    steps = list_checkpoints(run_dir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise MoelabError(f"step={step} has no checkpoint; choose one of: {steps}")
    try:
        from moelab.train.run import load_run
    except ImportError as e:
        raise MoelabError(f"tracing needs moelab.train.run.load_run, which is unavailable: {e}") from e
    run = load_run(run_dir, step=step)
    cfg = run.config if isinstance(run.config, dict) else _to_dict(run.config)
    key = (str(run_dir.resolve()), num_windows, seed)
    if window_cache is not None and key in window_cache:
        ids, labels, valid, dom, domains = window_cache[key]
    else:
        batch = _windows_for_run(run, cfg)
        domains = batch["domains"]
        ids, labels, valid, dom_raw = sample_windows(batch["batches"], num_windows, seed)
        dom = np.array([_domain_index(domains, d) for d in dom_raw])
        if window_cache is not None:
            window_cache[key] = (ids, labels, valid, dom, domains)
    model = run.model
    return trace_model(model, ids, dom, domains, labels_BL=labels, valid_BL=valid,
                       capture_hidden=capture_hidden, step=step, seed=seed,
                       config_hash_=config_hash(read_json(run_dir / "config.json")),
                       weights_checksum=checkpoint_checksum(run_dir, step))


def _to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    from dataclasses import asdict, is_dataclass

    if is_dataclass(cfg):
        return asdict(cfg)
    raise MoelabError(f"run config of type {type(cfg).__name__} cannot be read as a dict")


def _windows_for_run(run: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Validation windows of the run's corpus (the run's data config and saved tokenizer)."""
    try:
        from moelab.data.corpus import DataConfig, load_corpus
        from moelab.data.loader import eval_batches
    except ImportError as e:
        raise MoelabError(f"tracing needs moelab.data (corpus, loader), which is unavailable: {e}") from e
    data_cfg = getattr(run.config, "data", None)
    if data_cfg is None or isinstance(data_cfg, dict):
        data_cfg = DataConfig(**(cfg.get("data", {}) if data_cfg is None else data_cfg))
    splits = load_corpus(data_cfg)
    docs = splits.val or splits.test
    if not docs:
        raise MoelabError("the run's corpus has no validation documents to trace")
    seq_len = int(getattr(data_cfg, "seq_len", 0) or cfg.get("model", {}).get("max_seq_len", 128))
    return {"domains": list(splits.domains),
            "batches": eval_batches(docs, run.tokenizer, seq_len, 8, splits.domains,
                                    cache_dir=getattr(data_cfg, "cache_dir", None))}

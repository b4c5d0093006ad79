"""Typed configuration of a training run, mirroring the modules it configures.

``RunConfig(model: ModelConfig (with its MoEConfig), data: DataConfig, train: TrainConfig)``.
It is saved in every run directory as ``config.json``, can be loaded from TOML/YAML/JSON files and
overridden with dotted keys (``moe.router=sigmoid_topk``, ``train.steps=100``; ``moe.`` is short
for ``model.moe.``, ``layout.`` for ``model.layout.``). Values are parsed by the field's type; dict and list fields take JSON.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.data.corpus import DataConfig, atomic_write_bytes
from moelab.errors import MoelabError, check_choice, check_range, did_you_mean
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig

DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("stop", "skip")
RESUME_SCHEDULES = ("stretch", "continue")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop: AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    steps: optimizer steps; batch_size: sequences per micro-batch; grad_accum: micro-batches per step.
    grad_clip: max global gradient norm (0 = off). eval_every / ckpt_every: in steps (0 = only at
    the end). eval_max_batches: cap on validation batches per evaluation (None = the whole split).
    keep_last: checkpoints kept. log_every: plain log line period when stdout is not a terminal.
    dtype: "bfloat16" runs forward/backward under autocast. compile: wrap the model in torch.compile.
    on_nonfinite: what a step with a NaN/inf loss or gradient norm does: "stop" (default; raise naming the
    step, no update, no checkpoint) or "skip" (drop that step's update; stop after max_skipped_steps
    consecutive skips). collapse_window / collapse_ratio: warn when an MoE layer's load max/mean stays
    >= collapse_ratio * E/k, or an expert gets no tokens, for collapse_window steps (0 = off).
    See moelab.train.monitor.
    init_from: a run directory (trained or imported from Hugging Face) whose newest checkpoint and
    tokenizer start this run (``moelab train --init-from RUN``). only: "all" trains every parameter,
    "routers" only the MoE routers (experts, attention, embeddings frozen; Router-Tuning style).
    log: live logging backends besides metrics.jsonl (always on), comma-separated
    from "jsonl", "tensorboard", "wandb" (moelab.train.loggers); log_heatmap_every: steps between load
    heatmap images there. resume_schedule: when ``--resume`` changes train.steps, "stretch" (default)
    re-spreads the cosine over the new train.steps (the lr jumps up at the resume step), "continue" keeps
    the checkpoint's schedule (past its end the lr stays at min_lr_ratio * lr).
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_max_batches: int | None = None
    eval_batch_size: int | None = None
    ckpt_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    dtype: str = "float32"
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    collapse_window: int = 20
    collapse_ratio: float = 0.9
    init_from: str | None = None
    only: str = "all"
    log: str = "jsonl"
    log_heatmap_every: int = 100
    resume_schedule: str = "stretch"

    def validate(self) -> "TrainConfig":
        check_field_types(self, "train")
        for name in ("steps", "batch_size", "grad_accum", "keep_last", "log_every"):
            check_range(f"train.{name}", getattr(self, name), low=1)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "weight_decay", "grad_clip", "collapse_window"):
            check_range(f"train.{name}", getattr(self, name), low=0)
        check_range("train.lr", self.lr, low=0.0, low_inclusive=False)
        check_range("train.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_range("train.beta1", self.beta1, low=0.0, high=1.0, high_inclusive=False)
        check_range("train.beta2", self.beta2, low=0.0, high=1.0, high_inclusive=False)
        for name in ("eval_max_batches", "eval_batch_size", "threads"):
            if getattr(self, name) is not None:
                check_range(f"train.{name}", getattr(self, name), low=1)
        check_choice("train.dtype", self.dtype, DTYPES)
        check_choice("train.device", self.device, DEVICES)
        check_choice("train.on_nonfinite", self.on_nonfinite, NONFINITE)
        check_range("train.max_skipped_steps", self.max_skipped_steps, low=1)
        check_range("train.collapse_ratio", self.collapse_ratio, low=0.0, high=1.0, low_inclusive=False)
        check_choice("train.only", self.only, ("all", "routers"))
        check_range("train.log_heatmap_every", self.log_heatmap_every, low=0)
        check_choice("train.resume_schedule", self.resume_schedule, RESUME_SCHEDULES)
        from moelab.train.loggers import parse_log_spec

        parse_log_spec(self.log)
        return self


def _type_ok(value: Any, tp: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``tp`` (None: a type this check does not judge)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_type_ok(value, a) for a in args]
        return True if any(v is True for v in verdicts) else (None if None in verdicts else False)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, dict) or tp in (list, dict):
        return isinstance(value, origin or tp)
    return None


def check_field_types(obj: Any, prefix: str) -> None:
    """MoelabError naming the first field whose value does not have its annotated type
    (e.g. ``TrainConfig(lr="0.1")``: ``train.lr='0.1' is not valid; expected float``)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        if _type_ok(value, hints[f.name]) is False:
            raise MoelabError(f"{prefix}.{f.name}={value!r} is not valid; expected {_type_name(hints[f.name])} "
                              f"(got {type(value).__name__})")


@dataclass(kw_only=True)
class ParallelConfig:
    """Data and expert parallelism on torch.distributed (used by ``moelab.dist``; launch with torchrun).

    dp: data-parallel replicas, 0 = the world size (the only valid other value is the world size).
    ep: expert-parallel degree; divides the world size and ``moe.num_experts``.
    backend: "auto" (nccl with CUDA, else gloo), "gloo" or "nccl". timeout_s: limit on every
    collective (a dead rank makes the others exit with an error). ``train.batch_size`` is the global
    batch; each rank takes ``batch_size / world`` rows of it.
    """

    dp: int = 0
    ep: int = 1
    backend: str = "auto"
    timeout_s: float = 300.0

    def validate(self) -> "ParallelConfig":
        check_range("parallel.dp", self.dp, low=0)
        check_range("parallel.ep", self.ep, low=1)
        check_choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        check_range("parallel.timeout_s", self.timeout_s, low=0.0, low_inclusive=False)
        return self

    def active(self) -> bool:
        return self.dp > 1 or self.ep > 1


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs; ``config.json`` of a run directory is ``to_dict()``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "RunConfig":
        for obj, prefix in ((self.model, "model"), (self.model.moe, "moe"), (self.data, "data")):
            check_field_types(obj, prefix)
        self.train.validate()
        self.parallel.validate()
        self.model.validate()
        try:
            self.data.validate()
        except MoelabError as e:
            raise MoelabError(f"data.{e}") from None
        check_range("model.max_seq_len", self.model.max_seq_len, low=self.data.seq_len)
        _validate_moe(self.model.moe)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": self.data.to_dict(), "train": dataclasses.asdict(self.train),
                "parallel": dataclasses.asdict(self.parallel)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        cfg = cls()
        return apply_dict(cfg, d)

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` atomically (a crash never leaves half a file)."""
        atomic_write_bytes(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """From a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file (sections model/moe/data/train)."""
        return apply_dict(cls(), read_config_file(path))


def _validate_moe(moe: MoEConfig) -> None:
    """Check the names the MoE layer resolves (router, losses, ...) early, with valid choices."""
    try:
        from moelab.layers.routers import ROUTERS
    except ImportError:  # the router registry is not there (yet): the layer will check
        ROUTERS = None
    if ROUTERS is not None and len(ROUTERS):
        check_choice("moe.router", moe.router, ROUTERS.names())
    check_choice("moe.aux_loss", moe.aux_loss, ("none", "switch", "sequence", "global"))
    check_choice("moe.activation", moe.activation, ("swiglu", "gelu"))
    check_choice("moe.drop_policy", moe.drop_policy, ("probs", "position"))
    for name in ("d_ff", "num_experts"):
        check_range(f"moe.{name}", getattr(moe, name), low=1)
    check_range("moe.num_shared_experts", moe.num_shared_experts, low=0)
    check_range("moe.aux_loss_coef", moe.aux_loss_coef, low=0.0)
    if moe.capacity_factor is not None:
        check_range("moe.capacity_factor", moe.capacity_factor, low=0.0, low_inclusive=False)


# --------------------------------------------------------------------------- files


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MoelabError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if suffix == ".json":
            return json.loads(text)
    except Exception as e:  # noqa: BLE001 -- any parse error becomes a clear message
        raise MoelabError(f"config file {str(p)!r} could not be parsed: {e}") from None
    raise MoelabError(f"config file suffix {suffix!r} is not valid; choose one of: '.toml', '.yaml', '.yml', '.json'")


# --------------------------------------------------------------------------- overrides

_SECTIONS = ("model", "data", "train", "parallel")


def _resolve(cfg: RunConfig, key: str) -> tuple[Any, str]:
    """The dataclass holding dotted ``key`` and the field name in it (``moe.`` = ``model.moe.``)."""
    parts = key.split(".")
    if parts[0] in ("moe", "layout"):
        parts = ["model", *parts]
    if parts[0] not in _SECTIONS or len(parts) < 2:
        raise MoelabError(
            f"config key {key!r} is not valid; keys are SECTION.FIELD with SECTION one of: model, moe, data, train, layout, parallel"
        )
    obj: Any = cfg
    for i, name in enumerate(parts[:-1]):
        obj = _get_field(obj, name, ".".join(parts[:i]) or "config")
        if not dataclasses.is_dataclass(obj):
            raise MoelabError(f"config key {key!r} is not valid: {'.'.join(parts[: i + 1])} has no sub-fields")
    _get_field(obj, parts[-1], ".".join(parts[:-1]))
    return obj, parts[-1]


def _get_field(obj: Any, name: str, where: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise MoelabError(f"unknown config key {where}.{name!r}{did_you_mean(name, names)}; "
                          f"valid keys of {where}: {', '.join(names)}")
    return getattr(obj, name)


def _field_type(obj: Any, name: str) -> Any:
    return typing.get_type_hints(type(obj))[name]


def parse_value(text: Any, tp: Any, key: str) -> Any:
    """Parse ``text`` (a string from the command line, or an already-typed value) as type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(text, str) and text.lower() in ("none", "null") and type(None) in args:
            return None
        if text is None and type(None) in args:
            return None
        order = sorted((a for a in args if a is not type(None)), key=lambda a: 0 if a in (bool, int, float) else 1 if a is not str else 2)
        errors = []
        for a in order:
            try:
                return parse_value(text, a, key)
            except MoelabError as e:
                errors.append(str(e))
        raise MoelabError(f"{key}={text!r} is not valid; expected one of the types: {', '.join(map(_type_name, order))}")
    if tp is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(text, str) and text.lower() in ("false", "0", "no", "off"):
            return False
        raise MoelabError(f"{key}={text!r} is not valid; choose one of: true, false")
    if tp in (int, float):
        if isinstance(text, bool):
            raise MoelabError(f"{key}={text!r} is not valid; expected {tp.__name__}")
        if isinstance(text, (int, float)) and not (tp is int and isinstance(text, float) and not text.is_integer()):
            return tp(text)
        try:
            return tp(text) if tp is float else int(str(text), 0)
        except (TypeError, ValueError):
            raise MoelabError(f"{key}={text!r} is not valid; expected {tp.__name__}") from None
    if tp is str:
        if isinstance(text, str):
            return text
        raise MoelabError(f"{key}={text!r} is not valid; expected a string")
    if origin in (list, dict) or tp in (list, dict):
        value = text
        if isinstance(text, str):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise MoelabError(f"{key}={text!r} is not valid; expected JSON ({_type_name(tp)})") from None
        if not isinstance(value, origin or tp):
            raise MoelabError(f"{key}={text!r} is not valid; expected JSON ({_type_name(tp)})")
        if origin is list and args:
            return [parse_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return value
    raise MoelabError(f"{key}: unsupported field type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)


def set_key(cfg: RunConfig, key: str, value: Any) -> None:
    obj, name = _resolve(cfg, key)
    tp = _field_type(obj, name)
    if dataclasses.is_dataclass(getattr(obj, name)):
        if not isinstance(value, dict):
            raise MoelabError(f"{key} is a section; set its fields ({key}.FIELD)")
        for k, v in value.items():
            set_key(cfg, f"{key}.{k}", v)
        return
    setattr(obj, name, parse_value(value, tp, key))


def apply_dict(cfg: RunConfig, d: dict[str, Any], prefix: str = "") -> RunConfig:
    """Apply a nested mapping (e.g. a parsed TOML file) of section -> field -> value."""
    if not isinstance(d, dict):
        raise MoelabError(f"config {prefix or 'file'} must be a mapping of sections, got {type(d).__name__}")
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not _is_dict_field(cfg, key):
            apply_dict(cfg, v, prefix=key + ".")
        else:
            set_key(cfg, key, v)
    return cfg


def _is_dict_field(cfg: RunConfig, key: str) -> bool:
    if "." not in key:
        return False
    obj, name = _resolve(cfg, key)
    tp = _field_type(obj, name)
    return tp is dict or typing.get_origin(tp) is dict


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply command-line overrides ``["--moe.k", "2", "--train.steps=10", "moe.router=x", ...]``."""
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        body = tok[2:] if tok.startswith("--") else tok
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if not tok.startswith("--") or i + 1 >= len(overrides):
                raise MoelabError(f"override {tok!r} is not valid; expected --SECTION.FIELD VALUE or SECTION.FIELD=VALUE")
            key, value = body, overrides[i + 1]
            i += 2
        set_key(cfg, key, value)
    return cfg


def config_keys(cfg: RunConfig | None = None) -> list[str]:
    """Every settable dotted key (for help texts)."""
    cfg = cfg or RunConfig()
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{f.name}." if f.name in ("moe", "layout") else f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")

    for s in _SECTIONS:
        walk(getattr(cfg, s), f"{s}.")
    return out

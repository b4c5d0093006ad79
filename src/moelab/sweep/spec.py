"""Sweep specifications: a base configuration plus axes, expanded into runs.

A spec (TOML or YAML file, or a dict) looks like::

    name = "balancing"
    preset = "tiny"                 # the RunConfig preset every run starts from
    seeds = [0, 1, 2]
    [base]                          # dotted overrides applied to every run
    "train.steps" = 300
    [axes]                          # a grid: every combination of these values
    "moe.aux_loss" = ["none", "switch"]
    [[variants]]                    # or/and: named variants, each a set of overrides
    name = "aux-free"
    "moe.aux_free_bias" = true
    [[exclude]]                     # grid points to drop (all listed keys must match)
    "moe.aux_loss" = "none"

Runs are the grid (or the variants, or variants × grid when both are given) × seeds. Each run
gets a stable name from its overrides, so a re-run of the same spec finds its finished runs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError

SPEC_KEYS = {"name", "preset", "seeds", "base", "axes", "variants", "exclude", "fairness", "description",
             "common_init"}
# [fairness] table: relative tolerance on active parameters per token (max/min - 1) and an
# explicit opt-out of every fairness check (``--allow-unfair`` on the command line).
FAIRNESS_KEYS = {"active_param_tolerance": 0.05, "allow_unfair": False}


@dataclass(frozen=True)
class RunSpec:
    group: str  # configuration name without the seed (what seeds are aggregated over)
    seed: int
    overrides: dict[str, Any] = field(hash=False)

    @property
    def name(self) -> str:
        return f"{self.group}__seed{self.seed}"


@dataclass
class SweepSpec:
    name: str
    preset: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0])
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    fairness: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # common random numbers: runs of a seed share the first configuration's initial weights wherever
    # parameters match (moelab.sweep.crn); the data order is common anyway (data.seed is not varied)
    common_init: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        unknown = set(d) - SPEC_KEYS
        if unknown:
            raise MoelabError(
                f"unknown sweep spec key(s) {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}"
            )
        if "name" not in d:
            raise MoelabError("sweep spec needs a 'name'")
        spec = cls(**{k: v for k, v in d.items()})
        spec.check()
        return spec

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        path = Path(path)
        if not path.is_file():
            raise MoelabError(f"sweep spec file {str(path)!r} does not exist")
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise MoelabError(f"sweep spec {str(path)!r}: use a .toml, .yaml or .yml file")
        data.setdefault("name", path.stem)
        return cls.from_dict(data)

    def check(self) -> None:
        if not self.seeds:
            raise MoelabError("seeds is empty: a sweep needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise MoelabError(f"seeds={self.seeds!r} has duplicates; give distinct seeds")
        for name, part in (("base", self.base), ("axes", self.axes), ("fairness", self.fairness)):
            if not isinstance(part, dict):
                raise MoelabError(f"sweep spec '{name}' must be a table/mapping, got {type(part).__name__}")
        unknown = set(self.fairness) - set(FAIRNESS_KEYS)
        if unknown:
            raise MoelabError(f"unknown fairness key(s) {sorted(unknown)}; valid keys: {sorted(FAIRNESS_KEYS)}")
        tol = self.fairness.get("active_param_tolerance", 0.05)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise MoelabError(f"fairness.active_param_tolerance={tol!r} is not valid; expected a number >= 0")
        for key in ("train.seed",):
            if key in self.all_keys():
                raise MoelabError(f"{key!r} is set by 'seeds'; remove it from base/axes/variants")
        for key, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise MoelabError(f"axis {key!r} must be a non-empty list of values (got {values!r})")
        for v in self.variants:
            if "name" not in v:
                raise MoelabError(f"variant {v!r} needs a 'name'")
        if not self.expand():
            raise MoelabError(f"sweep {self.name!r} expands to an empty grid (everything excluded?)")

    def all_keys(self) -> set[str]:
        """Every config key the spec sets (base, axes, variants, exclusions)."""
        keys = set(self.base) | set(self.axes)
        for v in self.variants:
            keys |= {k for k in v if k != "name"}
        for ex in self.exclude:
            keys |= set(ex)
        return keys

    def fairness_setting(self, key: str) -> Any:
        return self.fairness.get(key, FAIRNESS_KEYS[key])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "seeds": list(self.seeds), "base": dict(self.base),
                "axes": {k: list(v) for k, v in self.axes.items()}, "variants": [dict(v) for v in self.variants],
                "exclude": [dict(e) for e in self.exclude], "fairness": dict(self.fairness),
                "description": self.description, "common_init": self.common_init}

    def expand(self) -> list[RunSpec]:
        grid_keys = list(self.axes)
        grid = [dict(zip(grid_keys, combo)) for combo in itertools.product(*self.axes.values())]
        variants = self.variants or [{"name": ""}]
        runs: list[RunSpec] = []
        for variant, point in itertools.product(variants, grid):
            ov = {**self.base, **{k: v for k, v in variant.items() if k != "name"}, **point}
            if any(all(ov.get(k) == v for k, v in ex.items()) for ex in self.exclude):
                continue
            parts = [variant["name"]] if variant["name"] else []
            parts += [f"{_short(k)}={_slug(v)}" for k, v in point.items()]
            group = "-".join(parts) or "base"
            runs += [RunSpec(group, int(s), {**ov, "train.seed": int(s)}) for s in self.seeds]
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise MoelabError("two runs of the sweep get the same name: give variants distinct names")
        return runs


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _slug(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(v)).strip("_")

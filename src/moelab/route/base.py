"""The model-router interface: fit on a training split, route a batch given a trade-off or budget.

Every router estimates, per prompt and model, a quality ``q_PM`` and a cost ``c_PM`` (USD), and
picks ``argmax_m (1 - mu) * q_PM - mu * c_PM / c_scale`` (the CARROT / RouterBench
"willingness to pay" rule; ``c_scale`` is the largest per-model mean training cost, so both terms are
on a [0, 1] scale). ``mu = 0`` asks for quality only, ``mu = 1`` for the cheapest model. Ties go to
the cheaper model. Routers whose paper uses another knob (RouteLLM's threshold, a cascade's
escalation rate) map ``mu`` onto it (see their docstrings). A budget (mean USD per prompt) is met by
bisection on ``mu`` over the router's own cost estimates for the batch.

Saved routers are a folder with ``router.json`` (config, metadata, featurizer vocabulary) and
``tensors.safetensors`` (arrays): no pickle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import MoelabError, check_range
from moelab.registry import Registry
from moelab.route.data import RoutingDataset
from moelab.route.features import Featurizer, TfidfSvdFeaturizer, featurizer_from_state, threads

MODEL_ROUTERS: Registry[type["ModelRouter"]] = Registry("model router")

# Trade-off grid used to sweep a router into a cost–quality curve: lambda = mu / (1 - mu).
_LAMBDAS = np.concatenate([[0.0], np.logspace(-3.5, 1.5, 79)])
DEFAULT_MUS = np.concatenate([_LAMBDAS / (1.0 + _LAMBDAS), [1.0]])


Batch = "RoutingDataset | list[str] | None"


class ModelRouter:
    """Base class. Subclasses set ``Config`` (a dataclass), ``needs_features`` and implement
    ``_fit(train, x_ND)`` and ``_estimate(x_PD, batch) -> (q_PM, c_PM)``."""

    name = "base"

    @dataclasses.dataclass
    class Config:
        pass

    needs_features = True
    uses_truth = False  # oracle: reads the batch's true scores
    two_model = False  # RouteLLM-style strong/weak routers
    cascade = False  # cost also includes the cheap model's attempt when escalating
    cv_grid: dict = {}  # option -> values tried by cross-validation (moelab.route.tuning)
    uses_torch = False  # imported before fitting, so ``threads`` limits its thread pool too

    def __init__(self, cfg: Any = None, **kw) -> None:
        if cfg is None:
            fields = {f.name for f in dataclasses.fields(self.Config)}
            bad = sorted(set(kw) - fields)
            if bad:
                raise MoelabError(
                    f"router {self.name!r} got unknown option(s) {bad}; valid options: {sorted(fields)}"
                )
            cfg = self.Config(**kw)
        self.cfg = cfg
        self.models: list[str] = []
        self.featurizer: Featurizer | None = None
        self.mean_cost_M: np.ndarray | None = None
        self.mean_q_M: np.ndarray | None = None
        self.c_scale = 1.0
        self.fitted = False

    # ------------------------------------------------------------------ fitting
    def fit(
        self, train: RoutingDataset, featurizer: Featurizer | None = None, x_ND: np.ndarray | None = None
    ) -> "ModelRouter":
        """Fit on ``train``. Text routers use ``featurizer`` (fitted on train texts if not given),
        or precomputed features ``x_ND``."""
        self.models = list(train.models)
        if self.two_model and len(self.models) != 2:
            raise MoelabError(
                f"router {self.name!r} routes between two models; the dataset has {len(self.models)} "
                f"({self.models}); select two with RoutingDataset.select_models"
            )
        self.mean_cost_M = train.costs_PM.mean(0)
        self.mean_q_M = train.scores_PM.mean(0)
        self.c_scale = float(self.mean_cost_M.max()) or 1.0
        if self.needs_features and x_ND is None:
            texts = train.require_texts()
            self.featurizer = featurizer if featurizer is not None else TfidfSvdFeaturizer().fit(texts)
            x_ND = self.featurizer.transform(texts)
        elif featurizer is not None:
            self.featurizer = featurizer
        if self.uses_torch:
            import torch  # noqa: F401
        with threads():
            self._fit(train, None if x_ND is None else np.asarray(x_ND, np.float32))
        self.fitted = True
        return self

    def _fit(self, train: RoutingDataset, x_ND: np.ndarray | None) -> None:
        pass

    # ------------------------------------------------------------------ routing
    def features(self, batch, x_PD: np.ndarray | None = None) -> np.ndarray | None:
        if not self.needs_features:
            return None
        if x_PD is not None:
            return np.asarray(x_PD, np.float32)
        if self.featurizer is None:
            raise MoelabError(f"router {self.name!r} was fitted on raw features; pass x_PD to route")
        texts = batch.require_texts() if isinstance(batch, RoutingDataset) else list(batch)
        for i, t in enumerate(texts):
            if not t:
                raise MoelabError(f"prompt {i} has no text; router {self.name!r} needs prompt text")
        return self.featurizer.transform(texts)

    def _check_batch(self, batch) -> None:
        if self.uses_truth and not isinstance(batch, RoutingDataset):
            raise MoelabError(f"router {self.name!r} reads true scores; pass a RoutingDataset batch")
        if isinstance(batch, RoutingDataset) and batch.models != self.models:
            raise MoelabError(f"batch models {batch.models} differ from the router's models {self.models}")

    def estimate(self, batch, x_PD: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Estimated quality ``q_PM`` and cost ``c_PM`` (USD) for each prompt and model."""
        if not self.fitted:
            raise MoelabError(f"router {self.name!r} is not fitted; call fit(train) first")
        self._check_batch(batch)
        x = self.features(batch, x_PD)
        with threads():
            return self._estimate(x, batch)

    def _estimate(self, x_PD, batch) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _n(self, x_PD, batch) -> int:
        if x_PD is not None:
            return len(x_PD)
        return batch.n_prompts if isinstance(batch, RoutingDataset) else len(batch)

    def _mean_costs(self, P: int) -> np.ndarray:
        return np.broadcast_to(self.mean_cost_M, (P, len(self.models))).copy()

    def decide(self, q_PM: np.ndarray, c_PM: np.ndarray, mu: float) -> np.ndarray:
        """argmax_m (1 - mu) q - mu c / c_scale; ties to the cheaper model."""
        u_PM = (1.0 - mu) * q_PM - mu * c_PM / self.c_scale
        u_PM = u_PM - 1e-12 * c_PM / self.c_scale  # tie-break: cheaper wins
        return np.argmax(u_PM, axis=1)

    def decide_grid(self, q_PM, c_PM, mus) -> np.ndarray:
        """Decisions ``idx_KP`` for each trade-off in ``mus`` (override for other knobs)."""
        return np.stack([self.decide(q_PM, c_PM, float(m)) for m in mus])

    def route(self, batch=None, tradeoff: float | None = 0.5, budget: float | None = None,
              x_PD: np.ndarray | None = None) -> np.ndarray:
        """Model indices ``idx_P`` (into ``self.models``) for a batch: a RoutingDataset or a list of
        prompt texts (or ``x_PD`` features). ``budget`` (mean USD per prompt) overrides ``tradeoff``."""
        return self._decide_for(*self.estimate(batch, x_PD), tradeoff, budget)

    def _decide_for(self, q_PM, c_PM, tradeoff, budget) -> np.ndarray:
        if budget is not None:
            return self._route_budget(q_PM, c_PM, budget)
        check_range("tradeoff", float(tradeoff), low=0.0, high=1.0)
        with threads():
            return self.decide_grid(q_PM, c_PM, [float(tradeoff)])[0]

    def route_explained(self, batch=None, tradeoff: float | None = 0.5, budget: float | None = None,
                        x_PD: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """:meth:`route` plus the router's own estimates behind each decision: ``idx_P``, the chosen
        model's estimated quality ``quality_P`` and the cost it expects to pay ``cost_P`` (a cascade
        includes the cheap model's attempt), and every model's estimates ``q_PM``, ``c_PM``."""
        q_PM, c_PM = self.estimate(batch, x_PD)
        idx = self._decide_for(q_PM, c_PM, tradeoff, budget)
        ar = np.arange(len(idx))
        return {"idx_P": idx, "quality_P": q_PM[ar, idx], "cost_P": self.paid_cost(idx, c_PM), "q_PM": q_PM,
                "c_PM": c_PM}

    def route_names(self, batch=None, **kw) -> list[str]:
        return [self.models[i] for i in self.route(batch, **kw)]

    def paid_cost(self, idx_P: np.ndarray, c_PM: np.ndarray) -> np.ndarray:
        """Cost actually paid for decisions (a cascade also pays the cheap model's attempt)."""
        return c_PM[np.arange(len(idx_P)), idx_P]

    def _route_budget(self, q_PM, c_PM, budget: float) -> np.ndarray:
        budget = float(budget)  # a numpy scalar would print as np.float64(...) in the error
        floor = float(c_PM.min(axis=1).mean())
        if not np.isfinite(budget) or budget < floor:
            raise MoelabError(
                f"budget={budget!r} USD per prompt is below the cheapest model's estimated mean cost "
                f"{floor:.3g} on this batch; no routing can meet it"
            )
        lo, hi = 0.0, 1.0  # cost is non-increasing in mu; find the smallest mu that meets budget
        best = self.decide_grid(q_PM, c_PM, [1.0])[0]
        if self.paid_cost(best, c_PM).mean() > budget:
            return best
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            idx = self.decide_grid(q_PM, c_PM, [mid])[0]
            if self.paid_cost(idx, c_PM).mean() <= budget:
                hi, best = mid, idx
            else:
                lo = mid
        return best

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    def _load_state(self, meta: dict, tensors: dict[str, np.ndarray]) -> None:
        pass

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        if not self.fitted:
            raise MoelabError(f"router {self.name!r} is not fitted; nothing to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta, tensors = self._state()
        tensors["base.mean_cost_M"] = self.mean_cost_M
        tensors["base.mean_q_M"] = self.mean_q_M
        fmeta = None
        if self.featurizer is not None:
            fmeta, ft = self.featurizer.state()
            tensors.update(ft)
        # safetensors writes the raw buffer: Fortran-ordered arrays (e.g. SVD output) must be copied
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        doc = {"router": self.name, "config": dataclasses.asdict(self.cfg), "models": self.models,
               "c_scale": self.c_scale, "state": meta, "featurizer": fmeta}
        (folder / "router.json").write_text(json.dumps(doc))
        save_file(tensors, str(folder / "tensors.safetensors"))
        return folder


def load_router(folder: str | Path) -> ModelRouter:
    """Load a router saved with :meth:`ModelRouter.save`."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / "router.json").exists():
        raise MoelabError(f"router folder={str(folder)!r} has no router.json")
    doc = json.loads((folder / "router.json").read_text())
    tensors = load_file(str(folder / "tensors.safetensors"))
    cls = MODEL_ROUTERS.get(doc["router"])
    r = cls(cls.Config(**doc["config"]))
    r.models = doc["models"]
    r.c_scale = doc["c_scale"]
    r.mean_cost_M = tensors["base.mean_cost_M"]
    r.mean_q_M = tensors["base.mean_q_M"]
    if doc["featurizer"] is not None:
        r.featurizer = featurizer_from_state(doc["featurizer"], tensors)
    r._load_state(doc["state"], tensors)
    r.fitted = True
    return r


def build_router(name: str, **kw) -> ModelRouter:
    return MODEL_ROUTERS.get(name)(**kw)

"""Shared base of the RouteLLM-style strong/weak routers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.errors import MoelabError, check_range
from moelab.route.base import ModelRouter
from moelab.route.data import RoutingDataset


class _TwoModel(ModelRouter):
    two_model = True

    def _strong_weak(self) -> tuple[int, int]:
        s = int(np.argmax(self.mean_q_M - 1e-12 * self.mean_cost_M))
        return s, 1 - s

    def _thresholds(self, score_N: np.ndarray) -> None:
        self.train_score_N = np.sort(np.asarray(score_N, np.float64))

    @staticmethod
    def threshold_for(score_N: np.ndarray, frac: float) -> float:
        """RouteLLM's calibration: the (1 - frac) quantile of scores, so a fraction ``frac`` of the
        calibration prompts scores at or above it."""
        if frac <= 0:
            return np.inf
        return float(np.quantile(score_N, 1.0 - frac, method="higher")) if frac < 1 else -np.inf

    def calibrate(self, cal: RoutingDataset | list[str], strong_frac: float, x_PD=None) -> float:
        """Set the threshold so ``strong_frac`` of ``cal``'s prompts go to the strong model
        (RouteLLM's ``calibrate_threshold``). Returns the threshold."""
        check_range("strong_frac", strong_frac, low=0.0, high=1.0)
        self.threshold = self.threshold_for(self.hardness(cal, x_PD), strong_frac)
        return self.threshold

    def hardness(self, batch, x_PD=None) -> np.ndarray:
        q, _ = self.estimate(batch, x_PD)
        return q[:, self.strong] - q[:, self.weak]

    def route_calibrated(self, batch=None, x_PD=None) -> np.ndarray:
        if getattr(self, "threshold", None) is None:
            raise MoelabError(f"router {self.name!r} has no calibrated threshold; call calibrate() first")
        h = self.hardness(batch, x_PD)
        return np.where(h >= self.threshold, self.strong, self.weak)

    def decide_grid(self, q_PM, c_PM, mus):
        """mu -> target strong fraction 1 - mu -> the threshold calibrated on training prompts."""
        h = q_PM[:, self.strong] - q_PM[:, self.weak]
        thr = [self.threshold_for(self.train_score_N, 1.0 - float(m)) for m in mus]
        return np.stack([np.where(h >= t, self.strong, self.weak) for t in thr])

    def _state(self):
        return ({"strong": self.strong, "weak": self.weak, "threshold": getattr(self, "threshold", None)},
                {"two.train_score_N": self.train_score_N})

    def _load_state(self, meta, t):
        self.strong, self.weak, self.threshold = meta["strong"], meta["weak"], meta["threshold"]
        self.train_score_N = t["two.train_score_N"]

"""Score calibration: Platt scaling of a bundle's raw scores, fitted on its out-of-fold predictions.

`metadata.json`'s `calibration` (`{"method": "platt", "slope": a, "intercept": b, ...}`) maps a
raw model output s to sigmoid(a * s + b). The worker applies it to every image score and to the
heatmap (`pipelines/model.py`), so breast and exam scores (max of images) and findings (heatmap
regions at or above the operating point) are all on the one calibrated scale the operating
points are expressed in. With a > 0 the map is strictly increasing: the ranking of images, the
AUC and every verdict at an operating point mapped through it are those of the raw scores.

Platt scaling (two parameters, maximum likelihood with Platt's smoothed targets) rather than
isotonic regression: a step function would tie images the model tells apart and move the
operating points. Fitted with numpy (Newton's method); no scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from node.errors import ModelError

CALIBRATION_KEY = "calibration"  # in a bundle's metadata.json
PLATT = "platt"


@dataclass(frozen=True)
class Calibration:
    """sigmoid(slope * raw + intercept); slope > 0."""

    slope: float
    intercept: float

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Calibration | None:
        """The bundle's calibration; None when it has none (raw scores reported)."""
        raw = metadata.get(CALIBRATION_KEY)
        if raw is None:
            return None
        try:
            method = raw["method"]
            slope, intercept = float(raw["slope"]), float(raw["intercept"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"metadata.json: calibration incomplete ({error!r})") from None
        if method != PLATT:
            raise ModelError(f"metadata.json: calibration method {method!r} not supported "
                             f"(supported: {PLATT})")
        if not (np.isfinite(slope) and np.isfinite(intercept) and slope > 0):
            raise ModelError(f"metadata.json: calibration slope {slope!r} must be finite and > 0 "
                             "(the map must keep the order of the scores)")
        return cls(slope, intercept)

    def score(self, raw: float) -> float:
        return float(1.0 / (1.0 + np.exp(-(self.slope * float(raw) + self.intercept))))

    def scores(self, raw: npt.ArrayLike) -> npt.NDArray[np.float64]:
        values = np.asarray(raw, dtype=np.float64)
        return np.asarray(1.0 / (1.0 + np.exp(-(self.slope * values + self.intercept))))

    def raw(self, calibrated: float) -> float:
        """The inverse map (for plots of the raw scores)."""
        p = min(max(float(calibrated), 1e-12), 1 - 1e-12)
        return float((np.log(p / (1 - p)) - self.intercept) / self.slope)

    def tensor_(self, values: torch.Tensor) -> torch.Tensor:
        """In place on a float tensor (a heatmap)."""
        return values.mul_(self.slope).add_(self.intercept).sigmoid_()


def fit_platt(labels: npt.ArrayLike, scores: npt.ArrayLike, iterations: int = 100
              ) -> Calibration:
    """Maximum-likelihood logistic fit of labels on raw scores, with Platt's targets
    ((N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives), by Newton's method."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError("labels and scores must be non-empty and of one length")
    positives, negatives = float((y == 1).sum()), float((y == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("calibration needs both classes")
    target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    design = np.column_stack([s, np.ones_like(s)])
    weights = np.array([0.0, float(np.log((positives + 1) / (negatives + 1)))])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ weights)))
        gradient = design.T @ (p - target)
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if float(np.abs(step).max()) < 1e-12:
            break
    slope, intercept = float(weights[0]), float(weights[1])
    if not slope > 0:
        raise ValueError(f"fitted slope {slope:.4g} is not positive: higher raw scores are not "
                         "more often abnormal, so there is nothing to calibrate")
    return Calibration(slope, intercept)

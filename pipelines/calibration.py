"""Score calibration: Platt scaling of a bundle's raw scores, fitted on its out-of-fold predictions.

`metadata.json`'s `calibration` maps a raw model output s (a probability in [0, 1]) to a
calibrated score, in one of two forms:

- `{"method": "platt", "slope": a, "intercept": b}`: sigmoid(a * s + b), Platt on the score
  itself. Its range is bounded: sigmoid(b) at s = 0 to sigmoid(a + b) at s = 1, so a network
  that is often nearly certain (raw scores above 0.99) reads the same capped score for all of them;
- `{"method": "platt-logit", "slope": a, "intercept": b, "clip": e}`: sigmoid(a * logit(s') + b)
  with s' = s clipped to [e, 1 - e], Platt on the network's log-odds (a temperature a and a
  shift b). Its range is (sigmoid(a * logit(e) + b), sigmoid(a * logit(1 - e) + b)), nearly all
  of (0, 1), and raw scores that differ near 0 or 1 stay apart. `e` is 2^-20 (about 1e-6, the
  resolution of the scores stored in predictions.jsonl), so the fit and the worker clip alike.

A bundle's exporter fits both on the out-of-fold predictions and keeps the one with the lower
cross-fitted log loss (`cross_fitted`: fitted on the other folds, applied to each fold, so the
choice is not made on the scores a map was fitted on); older bundles keep "platt".

The worker applies the map to every image score and to the heatmap (`pipelines/model.py`), so
breast and exam scores (max of images) and findings (heatmap regions at or above the operating
point) are all on the one calibrated scale the operating points are expressed in. With a > 0 the
map keeps the order of the scores: the ranking of images, the AUC and every verdict at an
operating point mapped through it are those of the raw scores (for "platt-logit", up to ties
among raw scores within 2^-20 of 0 or 1).

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
PLATT_LOGIT = "platt-logit"
METHODS = (PLATT, PLATT_LOGIT)
# About the resolution of the scores in predictions.jsonl (six decimals), and a power of two, so
# that the clip and 1 - clip are exact in float32: the heatmap (float32, in place) and the image
# score (float64) clip a saturated network's output to the same value.
LOGIT_CLIP = 2.0 ** -20


@dataclass(frozen=True)
class Calibration:
    """sigmoid(slope * x + intercept), x the raw score ("platt") or its clipped logit
    ("platt-logit"); slope > 0."""

    slope: float
    intercept: float
    method: str = PLATT
    clip: float = LOGIT_CLIP

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Calibration | None:
        """The bundle's calibration; None when it has none (raw scores reported)."""
        raw = metadata.get(CALIBRATION_KEY)
        if raw is None:
            return None
        try:
            method = raw["method"]
            slope, intercept = float(raw["slope"]), float(raw["intercept"])
            clip = float(raw.get("clip", LOGIT_CLIP))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ModelError(f"metadata.json: calibration incomplete ({error!r})") from None
        if method not in METHODS:
            raise ModelError(f"metadata.json: calibration method {method!r} not supported "
                             f"(supported: {', '.join(METHODS)})")
        if not (np.isfinite(slope) and np.isfinite(intercept) and slope > 0):
            raise ModelError(f"metadata.json: calibration slope {slope!r} must be finite and > 0 "
                             "(the map must keep the order of the scores)")
        if method == PLATT_LOGIT and not 0 < clip < 0.01:
            raise ModelError(f"metadata.json: calibration clip {clip!r} must be in (0, 0.01)")
        return cls(slope, intercept, method, clip)

    def _inputs(self, raw: npt.ArrayLike) -> npt.NDArray[np.float64]:
        values = np.asarray(raw, dtype=np.float64)
        if self.method == PLATT:
            return values
        return logit(values, self.clip)

    def score(self, raw: float) -> float:
        return float(self.scores(raw))

    def scores(self, raw: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return np.asarray(_sigmoid(self.slope * self._inputs(raw) + self.intercept))

    def raw(self, calibrated: float) -> float:
        """The inverse map (for plots of the raw scores)."""
        p = min(max(float(calibrated), 1e-12), 1 - 1e-12)
        x = (np.log(p / (1 - p)) - self.intercept) / self.slope
        return float(x) if self.method == PLATT else float(_sigmoid(x))

    def tensor_(self, values: torch.Tensor) -> torch.Tensor:
        """In place on a float tensor (a heatmap)."""
        if self.method == PLATT_LOGIT:
            values.clamp_(self.clip, 1 - self.clip).logit_()
        return values.mul_(self.slope).add_(self.intercept).sigmoid_()


def _sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64))))


def logit(values: npt.ArrayLike, clip: float = LOGIT_CLIP) -> npt.NDArray[np.float64]:
    p = np.clip(np.asarray(values, dtype=np.float64), clip, 1 - clip)
    return np.asarray(np.log(p / (1 - p)))


def fit_platt(labels: npt.ArrayLike, scores: npt.ArrayLike, iterations: int = 100,
              method: str = PLATT) -> Calibration:
    """Maximum-likelihood logistic fit of labels on the raw scores ("platt") or their clipped
    logits ("platt-logit"), with Platt's targets ((N+ + 1) / (N+ + 2) for positives,
    1 / (N- + 2) for negatives), by Newton's method."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} not supported")
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError("labels and scores must be non-empty and of one length")
    positives, negatives = float((y == 1).sum()), float((y == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("calibration needs both classes")
    x = s if method == PLATT else logit(s)
    target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    design = np.column_stack([x, np.ones_like(x)])
    weights = np.array([0.0, float(np.log((positives + 1) / (negatives + 1)))])
    for _ in range(iterations):
        p = _sigmoid(design @ weights)
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
    return Calibration(slope, intercept, method)


def log_loss(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def cross_fitted(labels: npt.ArrayLike, scores: npt.ArrayLike, folds: npt.ArrayLike,
                 method: str) -> npt.NDArray[np.float64]:
    """Each fold's scores calibrated by a map fitted on the other folds only (the folds of the
    out-of-fold predictions, grouped by woman): how the method calibrates scores it was not
    fitted on."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    fold = np.asarray(folds).ravel()
    if not y.shape == s.shape == fold.shape:
        raise ValueError("labels, scores and folds must be of one length")
    if len(np.unique(fold)) < 2:
        raise ValueError("cross-fitting needs at least two folds")
    out = np.empty_like(s)
    for value in np.unique(fold):
        held = fold == value
        out[held] = fit_platt(y[~held], s[~held], method=method).scores(s[held])
    return out

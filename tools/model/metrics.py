"""Evaluation metrics for the ML tools (numpy only).

Scores are "higher = more suspicious"; a score at or above a threshold is called positive.
Confidence intervals resample groups (women), never images, so a woman's two breasts move
together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np


class _Circle(Protocol):
    x: float
    y: float
    r: float


def _as_arrays(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def auc(labels: Any, scores: Any) -> float:
    """Mann-Whitney AUC, ties counted half; nan when one class is absent."""
    y, s = _as_arrays(labels, scores)
    positives = int((y == 1).sum())
    negatives = int(len(y) - positives)
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # average rank (1-based) of each distinct value
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][y == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _group_resamples(groups: Any, size: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """`n` bootstrap resamples of the images, drawing whole groups (women) with replacement."""
    g = np.asarray(groups).ravel()
    if g.shape != (size,):
        raise ValueError("groups must have one entry per image")
    rng = np.random.default_rng(seed)
    unique, group_index = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(group_index == i) for i in range(len(unique))]
    for _ in range(n):
        chosen = rng.integers(0, len(unique), len(unique))
        yield np.concatenate([members[i] for i in chosen])


def _percentiles(values: list[float], alpha: float) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return (float(np.percentile(values, 100 * alpha / 2)),
            float(np.percentile(values, 100 * (1 - alpha / 2))))


def bootstrap_auc_ci(labels: Any, scores: Any, groups: Any, n: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of the AUC, resampling groups with replacement; resamples that miss a
    class are skipped."""
    y, s = _as_arrays(labels, scores)
    values = [value for idx in _group_resamples(groups, len(y), n, seed)
              if not np.isnan(value := auc(y[idx], s[idx]))]
    return _percentiles(values, alpha)


def bootstrap_auc_difference(labels: Any, scores_b: Any, scores_a: Any, groups: Any,
                             n: int = 2000, seed: int = 0, alpha: float = 0.05
                             ) -> tuple[float, float, float]:
    """Paired AUC difference of two scorings of the same images (b minus a) and its percentile
    CI, both AUCs taken on the same resample of groups (women) each round; resamples that miss
    a class are skipped."""
    y, b = _as_arrays(labels, scores_b)
    _, a = _as_arrays(labels, scores_a)
    if a.shape != b.shape:
        raise ValueError("the two scorings must score the same images")
    values = [value for idx in _group_resamples(groups, len(y), n, seed)
              if not np.isnan(value := auc(y[idx], b[idx]) - auc(y[idx], a[idx]))]
    low, high = _percentiles(values, alpha)
    return auc(y, b) - auc(y, a), low, high


def bootstrap_rate_ci(outcomes: Any, groups: Any, n: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of a proportion (the mean of 0/1 `outcomes`, e.g. whether each normal
    image is below a threshold: the specificity), resampling groups (women) with replacement;
    (nan, nan) without outcomes."""
    values = np.asarray(outcomes, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan"), float("nan")
    return _percentiles([float(values[idx].mean())
                         for idx in _group_resamples(groups, values.size, n, seed)], alpha)


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending from +inf (nothing positive) to the lowest
    score (everything positive); point i counts score >= thresholds[i] as positive."""
    y, s = _as_arrays(labels, scores)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]  # end of each value
    tps = np.cumsum(y_sorted == 1)[last] if len(s) else np.zeros(0)
    fps = np.cumsum(y_sorted == 0)[last] if len(s) else np.zeros(0)
    positives = max(int((y == 1).sum()), 1)
    negatives = max(int((y == 0).sum()), 1)
    thresholds = np.r_[np.inf, s_sorted[last]] if len(s) else np.array([np.inf])
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def threshold_metrics(labels: Any, scores: Any, threshold: float) -> dict[str, float | int]:
    """Confusion counts and the usual rates at one threshold (score >= threshold: positive)."""
    y, s = _as_arrays(labels, scores)
    predicted = s >= threshold
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    tn = int((~predicted & (y == 0)).sum())
    fn = int((~predicted & (y == 1)).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if precision + recall > 0 else (0.0 if tp + fp + fn else float("nan")))
    return {
        "threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": _ratio(tp + tn, len(y)), "precision": precision, "recall": recall,
        "f1": float(f1), "sensitivity": recall, "specificity": _ratio(tn, tn + fp),
    }


def operating_points(labels: Any, scores: Any,
                     min_sensitivity: float = 0.9) -> dict[str, dict[str, float]]:
    """"balanced": the threshold maximising Youden's J (sensitivity + specificity - 1; the
    highest such threshold on ties); "high_sensitivity": the highest threshold whose
    sensitivity is at least `min_sensitivity`. Thresholds are observed scores."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if len(thresholds) == 0:
        raise ValueError("no scores")
    youden = tpr - fpr
    balanced = int(np.argmax(youden))  # thresholds descend: first max = highest threshold
    reaching = np.flatnonzero(tpr >= min_sensitivity - 1e-12)
    sensitive = int(reaching[0]) if len(reaching) else len(thresholds) - 1
    return {
        name: {"threshold": float(thresholds[i]), "sensitivity": float(tpr[i]),
               "specificity": float(1.0 - fpr[i])}
        for name, i in (("balanced", balanced), ("high_sensitivity", sensitive))
    }


def exam_scores(labels: Any, scores: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per group (a woman: her exam), whether any image is abnormal and the highest score, as
    the node reports an exam; groups in sorted order."""
    y, s = _as_arrays(labels, scores)
    g = np.asarray(groups).ravel()
    if g.shape != y.shape:
        raise ValueError("groups must have one entry per image")
    unique, index = np.unique(g, return_inverse=True)
    exam_labels = np.zeros(len(unique), dtype=int)
    exam_max = np.full(len(unique), -np.inf)
    np.maximum.at(exam_labels, index, y)
    np.maximum.at(exam_max, index, s)
    return exam_labels, exam_max


def exam_operating_point(labels: Any, scores: Any, groups: Any,
                         min_specificity: float = 0.9) -> dict[str, float]:
    """The lowest threshold (an observed exam score) at which at least `min_specificity` of the
    normal exams (groups with no abnormal image) have no image at or above it: the most
    sensitive exam verdict that keeps that share of normal women unrecalled. Sensitivity and
    specificity are per exam."""
    exam_labels, exam_max = exam_scores(labels, scores, groups)
    fpr, tpr, thresholds = roc_curve(exam_labels, exam_max)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if len(thresholds) == 0:
        raise ValueError("no scores")
    keeping = np.flatnonzero(1.0 - fpr >= min_specificity - 1e-12)
    i = int(keeping[-1]) if len(keeping) else 0  # thresholds descend: the last is the lowest
    return {"threshold": float(thresholds[i]), "exam_sensitivity": float(tpr[i]),
            "exam_specificity": float(1.0 - fpr[i])}


def calibration_bins(labels: Any, scores: Any, bins: int = 10) -> list[dict[str, float | int]]:
    """Equal-width score bins over [0, 1] (the last bin closed): count, mean score and the
    fraction of positives per bin (nan mean/fraction for an empty bin)."""
    y, s = _as_arrays(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    out: list[dict[str, float | int]] = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        out.append({
            "lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
            "mean_score": float(s[inside].mean()) if count else float("nan"),
            "fraction_positive": float(y[inside].mean()) if count else float("nan"),
        })
    return out


def _lesion_xyr(lesion: Any) -> tuple[float, float, float]:
    if isinstance(lesion, dict):
        return float(lesion["x"]), float(lesion["y"]), float(lesion["r"])
    if hasattr(lesion, "x"):
        return float(lesion.x), float(lesion.y), float(lesion.r)
    x, y, r = lesion
    return float(x), float(y), float(r)


def lesion_hit(heatmap: Any, lesions: Sequence[Any], scale_x: float, scale_y: float) -> bool:
    """The heatmap's peak (argmax) falls inside a lesion circle.

    Heatmap cell (i, j) covers image pixels [j, j+1) * scale_x horizontally and [i, i+1) *
    scale_y vertically, so its centre is ((j + 0.5) scale_x - 0.5, (i + 0.5) scale_y - 0.5).
    Lesions are (x, y, r) in image pixels (Lesion objects, dicts or tuples); a radius smaller
    than one cell counts as one cell, so a tiny lesion can be hit at all on a coarse grid.
    """
    grid = np.asarray(heatmap, dtype=np.float64)
    grid = grid.reshape(grid.shape[-2:]) if grid.ndim > 2 else grid
    if not lesions or grid.size == 0:
        return False
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    peak_x = (col + 0.5) * scale_x - 0.5
    peak_y = (row + 0.5) * scale_y - 0.5
    cell = max(float(scale_x), float(scale_y))
    for lesion in lesions:
        x, y, r = _lesion_xyr(lesion)
        if (peak_x - x) ** 2 + (peak_y - y) ** 2 <= max(r, cell) ** 2:
            return True
    return False


def hit_rate(heatmaps: Sequence[Any], lesion_lists: Sequence[Sequence[Any]],
             scales: Sequence[tuple[float, float]]) -> tuple[int, int]:
    """(hits, images with at least one lesion); images without lesions are not counted."""
    if not (len(heatmaps) == len(lesion_lists) == len(scales)):
        raise ValueError("heatmaps, lesion_lists and scales differ in length")
    hits = total = 0
    for heatmap, lesions, (scale_x, scale_y) in zip(heatmaps, lesion_lists, scales, strict=True):
        if not lesions:
            continue
        total += 1
        hits += lesion_hit(heatmap, lesions, scale_x, scale_y)
    return hits, total

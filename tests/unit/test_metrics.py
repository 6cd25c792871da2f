"""tools/model/metrics.py on small cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.model.dataset import Lesion
from tools.model.metrics import (
    auc,
    bootstrap_auc_ci,
    bootstrap_auc_difference,
    calibration_bins,
    hit_rate,
    lesion_hit,
    operating_points,
    roc_curve,
    threshold_metrics,
)


def test_auc_perfect_inverted_tied_and_degenerate() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs: (p=.4 vs .1 win, vs .4 tie), (p=.8 wins both) -> (1 + .5 + 2) / 4
    assert auc([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(0.875)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_auc_matches_pairwise_definition_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg))
    assert auc(labels, scores) == pytest.approx(expected)


def test_bootstrap_ci_resamples_groups() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 50)
    scores = labels + rng.normal(0, 1.0, 100)
    groups = np.arange(100) // 2
    low, high = bootstrap_auc_ci(labels, scores, groups, n=500, seed=0)
    assert low < auc(labels, scores) < high and 0.0 <= low < high <= 1.0
    assert (low, high) == bootstrap_auc_ci(labels, scores, groups, n=500, seed=0)
    perfect = bootstrap_auc_ci(labels, labels.astype(float), groups, n=200)
    assert perfect == (1.0, 1.0)


def test_roc_curve_points() -> None:
    fpr, tpr, thresholds = roc_curve([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.8])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_threshold_metrics() -> None:
    m = threshold_metrics([1, 1, 1, 0, 0, 0, 0], [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.6], 0.6)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 1)
    assert m["sensitivity"] == m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == 0.5 and m["precision"] == 0.5 and m["accuracy"] == pytest.approx(4 / 7)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["threshold"] == 0.6


def test_operating_points() -> None:
    labels = [0, 0, 0, 0, 1, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9]
    points = operating_points(labels, scores)
    # Youden: at 0.6 sens 4/5 spec 1 (J .8); at 0.45 sens 1 spec 4/5 (J .8): highest wins
    assert points["balanced"] == {"threshold": 0.6, "sensitivity": 0.8, "specificity": 1.0}
    assert points["high_sensitivity"] == {"threshold": 0.45, "sensitivity": 1.0,
                                          "specificity": 0.8}
    for point in points.values():
        m = threshold_metrics(labels, scores, point["threshold"])
        assert m["sensitivity"] == point["sensitivity"] and m["specificity"] == point["specificity"]


def test_calibration_bins() -> None:
    bins = calibration_bins([0, 1, 1, 0, 1], [0.05, 0.15, 0.95, 0.12, 1.0], bins=10)
    assert len(bins) == 10 and bins[0]["count"] == 1 and bins[1]["count"] == 2
    assert bins[1]["fraction_positive"] == 0.5 and bins[1]["mean_score"] == pytest.approx(0.135)
    assert bins[9]["count"] == 2 and bins[9]["fraction_positive"] == 1.0  # 1.0 in the last bin
    assert math.isnan(bins[5]["mean_score"])


def test_lesion_hit_and_hit_rate() -> None:
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[2, 5] = 1.0  # cell centre on a 4x-scaled grid: x = 5.5*4-0.5 = 21.5, y = 9.5
    assert lesion_hit(heatmap, [Lesion(21.0, 10.0, 3.0)], 4.0, 4.0)
    assert lesion_hit(heatmap[None, None], [{"x": 21.5, "y": 9.5, "r": 1.0}], 4.0, 4.0)
    assert not lesion_hit(heatmap, [(40.0, 10.0, 5.0)], 4.0, 4.0)
    assert lesion_hit(heatmap, [(40.0, 10.0, 5.0), (22.0, 12.0, 5.0)], 4.0, 4.0)
    assert lesion_hit(heatmap, [(21.5, 19.0, 10.0)], 4.0, 2.0) is False  # y = 2.5*2-.5 = 4.5
    assert not lesion_hit(heatmap, [], 4.0, 4.0)
    hits = hit_rate([heatmap, heatmap, heatmap], [[(21.0, 10.0, 3.0)], [], [(0.0, 0.0, 2.0)]],
                    [(4.0, 4.0)] * 3)
    assert hits == (1, 2)


def test_the_paired_auc_difference_resamples_women_once_for_both_scorings() -> None:
    """`bootstrap_auc_difference`: b minus a on the same images; identical scorings differ by
    exactly 0 in every resample, a scoring that ranks better gives a positive difference whose
    interval lies around it, and the single-scoring CI is unchanged by the shared resampler."""
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 60)
    groups = np.arange(120) // 2
    noisy = labels + rng.normal(scale=1.5, size=120)
    sharper = labels + rng.normal(scale=0.5, size=120)
    assert bootstrap_auc_difference(labels, noisy, noisy, groups, n=200) == (0.0, 0.0, 0.0)
    diff, low, high = bootstrap_auc_difference(labels, sharper, noisy, groups, n=500, seed=1)
    assert diff == pytest.approx(auc(labels, sharper) - auc(labels, noisy))
    assert 0.0 < low < diff < high
    flipped, flow, fhigh = bootstrap_auc_difference(labels, noisy, sharper, groups, n=500, seed=1)
    assert (flipped, flow, fhigh) == pytest.approx((-diff, -high, -low))
    with pytest.raises(ValueError):
        bootstrap_auc_difference(labels, noisy, noisy[:-2], groups)


def test_the_exam_point_keeps_the_share_of_normal_women_unflagged() -> None:
    """Per woman the highest score and whether any image is abnormal; the point is the lowest
    exam score that keeps at least the given share of normal women below it."""
    labels = [0, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    scores = [0.1, 0.3, 0.2, 0.6, 0.4, 0.9, 0.5, 0.2, 0.35, 0.15]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    from tools.model import metrics

    exam_labels, exam_max = metrics.exam_scores(labels, scores, groups)
    assert exam_labels.tolist() == [0, 0, 1, 1, 0]
    assert exam_max.tolist() == [0.3, 0.6, 0.9, 0.5, 0.35]
    # normal exams 0.3, 0.6, 0.35: keeping 2 of 3 below needs a threshold above 0.35, and the
    # lowest observed exam score above it is 0.5 (the abnormal woman d, caught)
    point = metrics.exam_operating_point(labels, scores, groups, min_specificity=0.6)
    assert point == pytest.approx({"threshold": 0.5, "exam_sensitivity": 1.0,
                                   "exam_specificity": 2 / 3})
    strict = metrics.exam_operating_point(labels, scores, groups, min_specificity=1.0)
    assert strict == {"threshold": 0.9, "exam_sensitivity": 0.5, "exam_specificity": 1.0}

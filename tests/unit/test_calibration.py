"""Platt calibration (pipelines/calibration.py): the fit on the score and on its logit, the map,
the choice between them by cross-fitted log loss, and the shipped bundle on its calibrated scale
with every verdict of its out-of-fold images unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.errors import ModelError
from pipelines import calibration as cal
from pipelines.calibration import PLATT, PLATT_LOGIT, Calibration, fit_platt
from tools.model import metrics
from tools.model.export import (
    add_exam_points,
    calibration_folds,
    compare_calibrations,
    read_predictions,
    reference_of_predictions,
)

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"


def test_fit_recovers_a_known_logistic_relation() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-(6.0 * scores - 4.0)))
    fitted = fit_platt(labels, scores)
    assert fitted.slope == pytest.approx(6.0, rel=0.08)
    assert fitted.intercept == pytest.approx(-4.0, rel=0.08)
    # The calibrated scores are calibrated: mean prediction per bin close to the observed rate.
    for b in metrics.calibration_bins(labels, fitted.scores(scores), bins=5):
        if b["count"] > 500:
            assert abs(b["mean_score"] - b["fraction_positive"]) < 0.03


def test_the_logit_fit_recovers_a_temperature_and_shift() -> None:
    """An overconfident network: its log-odds are 3x too large and shifted; Platt on the logit
    recovers slope 1/3 and the shift, Platt on the score cannot (its range is capped)."""
    rng = np.random.default_rng(1)
    true_logit = rng.normal(-0.5, 2.0, 20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-true_logit))
    scores = 1 / (1 + np.exp(-(3.0 * true_logit + 1.5)))
    fitted = fit_platt(labels, scores, method=PLATT_LOGIT)
    assert fitted.method == PLATT_LOGIT
    assert fitted.slope == pytest.approx(1 / 3, rel=0.06)
    assert fitted.intercept == pytest.approx(-0.5, abs=0.06)
    on_score = fit_platt(labels, scores)
    assert on_score.score(1.0) < 0.9 < fitted.score(1.0)
    assert cal.log_loss(labels, fitted.scores(scores)) < cal.log_loss(labels, on_score.scores(scores))


@pytest.mark.parametrize("calibration", [Calibration(3.0, -2.0),
                                         Calibration(0.4, -1.0, PLATT_LOGIT)])
def test_the_map_is_strictly_increasing_and_the_same_on_tensors(calibration: Calibration) -> None:
    raw = np.linspace(0, 1, 1001)
    calibrated = calibration.scores(raw)
    assert np.all(np.diff(calibrated) > 0)
    assert calibration.score(0.5) == pytest.approx(calibrated[500])
    assert calibration.raw(calibration.score(0.3)) == pytest.approx(0.3)
    tensor = torch.tensor(raw, dtype=torch.float32)
    np.testing.assert_allclose(calibration.tensor_(tensor).numpy(), calibrated, atol=1e-6)


def test_the_logit_map_clips_at_the_stored_resolution() -> None:
    """0 and 1 (a saturated network, or a score stored with six decimals) map to finite logits:
    the calibrated range is bounded away from 0 and 1 by the clip, and the metadata round-trips."""
    calibration = Calibration(0.33, -0.99, PLATT_LOGIT)
    assert cal.logit([0.0, 1.0]).tolist() == pytest.approx([-20 * np.log(2), 20 * np.log(2)], abs=1e-5)
    assert calibration.score(1.0) == calibration.score(1 - cal.LOGIT_CLIP) < 1.0
    assert calibration.score(0.0) == calibration.score(cal.LOGIT_CLIP) > 0.0
    metadata = {"calibration": {"method": PLATT_LOGIT, "slope": 0.33, "intercept": -0.99,
                                "clip": cal.LOGIT_CLIP}}
    assert Calibration.from_metadata(metadata) == calibration


def test_a_fit_that_would_reverse_the_ranking_or_bad_metadata_is_refused() -> None:
    with pytest.raises(ValueError, match="not positive"):
        fit_platt([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9])
    with pytest.raises(ValueError, match="both classes"):
        fit_platt([1, 1], [0.1, 0.2])
    assert Calibration.from_metadata({}) is None
    for bad, message in (({"method": "isotonic", "slope": 1, "intercept": 0}, "not supported"),
                         ({"method": "platt", "slope": -1, "intercept": 0}, "slope"),
                         ({"method": "platt"}, "incomplete"),
                         ({"method": PLATT_LOGIT, "slope": 1, "intercept": 0, "clip": 0.5},
                          "clip")):
        with pytest.raises(ModelError, match=message):
            Calibration.from_metadata({"calibration": bad})


def test_the_shipped_bundle_is_calibrated_and_its_verdicts_are_unchanged() -> None:
    """Operating points recomputed on the calibrated out-of-fold scores (tools/model/metrics.py's
    rules) pick exactly the images the raw thresholds picked, at every operating point."""
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    calibration = Calibration.from_metadata(metadata)
    assert calibration is not None
    rows = [json.loads(line) for line in (BUNDLE / "predictions.jsonl").read_text().splitlines()]
    labels = np.array([r["label"] for r in rows])
    raw = np.array([r["score"] for r in rows], dtype=np.float64)
    calibrated = calibration.scores(raw)
    # The method is the one with the lower cross-fitted log loss, refitted on every score.
    method, compared = compare_calibrations(labels, raw, calibration_folds(rows))
    assert calibration.method == method and metadata["calibration"]["methods_compared"] == compared
    assert calibration.slope == pytest.approx(fit_platt(labels, raw, method=method).slope)
    groups = [r["group"] for r in rows]  # the exam point is chosen per woman
    points = add_exam_points(metrics.operating_points(labels, calibrated), labels, calibrated,
                             groups)
    assert metadata["operating_points"] == {k: v["threshold"] for k, v in points.items()}
    raw_points = add_exam_points(metrics.operating_points(labels, raw), labels, raw, groups)
    assert metadata["calibration"]["raw_operating_points"] == {
        k: v["threshold"] for k, v in raw_points.items()}
    assert set(points) == {"balanced", "high_sensitivity", "exam_specificity_90"}
    for name in points:
        before = raw >= raw_points[name]["threshold"]
        after = calibrated >= metadata["operating_points"][name]
        assert np.array_equal(before, after), name
        at = metadata["metrics"]["at_operating_points"][name]
        assert (at["tp"], at["fp"]) == (int((before & (labels == 1)).sum()),
                                        int((before & (labels == 0)).sum()))
    # Equal up to ties among the raw scores the logit's clip joins (within 2^-20 of 0 or 1).
    assert metrics.auc(labels, calibrated) == pytest.approx(metrics.auc(labels, raw), abs=1e-3)
    # Calibrated to MIAS's prevalence: the mean calibrated score is near it, the raw one is not.
    assert abs(float(calibrated.mean()) - float(labels.mean())) < 0.02
    assert abs(float(raw.mean()) - float(labels.mean())) > 0.2
    # The drift reference is on the scale the worker reports.
    assert metadata["reference_scores"] == reference_of_predictions(
        BUNDLE / "predictions.jsonl", calibration)


def test_cross_fitting_calibrates_each_fold_with_a_map_fitted_on_the_others() -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random(400) < 0.35).astype(int)
    scores = 1 / (1 + np.exp(-(4.0 * (labels - 0.5) + rng.normal(0, 2.5, 400))))
    folds = np.arange(400) % 5
    out = cal.cross_fitted(labels, scores, folds, PLATT_LOGIT)
    held = folds == 3
    expected = fit_platt(labels[~held], scores[~held], method=PLATT_LOGIT).scores(scores[held])
    np.testing.assert_allclose(out[held], expected)
    assert not np.allclose(out, fit_platt(labels, scores, method=PLATT_LOGIT).scores(scores))
    with pytest.raises(ValueError, match="two folds"):
        cal.cross_fitted(labels, scores, np.zeros(400), PLATT)


def test_the_choice_follows_the_cross_fitted_log_loss() -> None:
    """Overconfident log-odds: the logit wins. Scores whose log-odds are linear in the score
    itself (Platt's own model): Platt on the score wins. Either way, what was compared is
    recorded for every method."""
    rng = np.random.default_rng(4)
    true_logit = rng.normal(-0.6, 1.5, 600)
    labels = (rng.random(600) < 1 / (1 + np.exp(-true_logit))).astype(int)
    folds = np.arange(600) % 5
    overconfident = 1 / (1 + np.exp(-4.0 * true_logit))
    method, compared = compare_calibrations(labels, overconfident, folds)
    assert method == PLATT_LOGIT
    assert set(compared) == {PLATT, PLATT_LOGIT}
    assert (compared[PLATT_LOGIT]["cross_fitted_log_loss"]
            < compared[PLATT]["cross_fitted_log_loss"])
    score = rng.random(2000)
    linear_labels = (rng.random(2000) < 1 / (1 + np.exp(-(6.0 * score - 4.0)))).astype(int)
    method, compared = compare_calibrations(linear_labels, score, np.arange(2000) % 5)
    assert method == PLATT
    assert (compared[PLATT]["cross_fitted_log_loss"]
            <= compared[PLATT_LOGIT]["cross_fitted_log_loss"])


def test_a_method_that_fails_a_fold_is_reported_not_chosen() -> None:
    """When the other folds hold one class only, neither method can be fitted for that fold:
    the choice is refused with the reason, not made on the folds that worked."""
    labels = np.array([0, 1] * 10 + [1] * 4)
    scores = np.linspace(0.05, 0.95, 24)
    folds = np.array([0] * 20 + [1] * 4)
    with pytest.raises(ValueError, match="no calibration method fits every fold"):
        compare_calibrations(labels, scores, folds)


def test_folds_come_from_the_predictions_or_from_the_women() -> None:
    with_folds = [{"id": "a", "group": "w1", "fold": 2}, {"id": "b", "group": "w1", "fold": 2},
                  {"id": "c", "group": "w2", "fold": 0}]
    assert calibration_folds(with_folds).tolist() == [2, 2, 0]
    rows = [{"id": f"i{i}", "group": f"w{i // 2}"} for i in range(40)]
    folds = calibration_folds(rows, folds=5)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    for i in range(0, 40, 2):  # one woman's two images, one fold
        assert folds[i] == folds[i + 1]
    shipped = read_predictions(BUNDLE / "predictions.jsonl")
    assert calibration_folds(shipped).tolist() == [int(r["fold"]) for r in shipped]

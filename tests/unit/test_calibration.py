"""Platt calibration (pipelines/calibration.py): the fit, the map, and the shipped bundle on its
calibrated scale with every verdict of its out-of-fold images unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.errors import ModelError
from pipelines.calibration import Calibration, fit_platt
from tools.model import metrics
from tools.model.export import reference_of_predictions

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


def test_the_map_is_strictly_increasing_and_the_same_on_tensors() -> None:
    calibration = Calibration(3.0, -2.0)
    raw = np.linspace(0, 1, 1001)
    calibrated = calibration.scores(raw)
    assert np.all(np.diff(calibrated) > 0)
    assert calibration.score(0.5) == pytest.approx(calibrated[500])
    assert calibration.raw(calibration.score(0.3)) == pytest.approx(0.3)
    tensor = torch.tensor(raw, dtype=torch.float32)
    np.testing.assert_allclose(calibration.tensor_(tensor).numpy(), calibrated, atol=1e-6)


def test_a_fit_that_would_reverse_the_ranking_or_bad_metadata_is_refused() -> None:
    with pytest.raises(ValueError, match="not positive"):
        fit_platt([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9])
    with pytest.raises(ValueError, match="both classes"):
        fit_platt([1, 1], [0.1, 0.2])
    assert Calibration.from_metadata({}) is None
    for bad, message in (({"method": "isotonic", "slope": 1, "intercept": 0}, "not supported"),
                         ({"method": "platt", "slope": -1, "intercept": 0}, "slope"),
                         ({"method": "platt"}, "incomplete")):
        with pytest.raises(ModelError, match=message):
            Calibration.from_metadata({"calibration": bad})


def test_the_shipped_bundle_is_calibrated_and_its_verdicts_are_unchanged() -> None:
    """Operating points recomputed on the calibrated out-of-fold scores (tools/model/metrics.py's
    rules) pick exactly the images the raw thresholds picked, at both operating points."""
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    calibration = Calibration.from_metadata(metadata)
    assert calibration is not None and metadata["calibration"]["method"] == "platt"
    rows = [json.loads(line) for line in (BUNDLE / "predictions.jsonl").read_text().splitlines()]
    labels = np.array([r["label"] for r in rows])
    raw = np.array([r["score"] for r in rows], dtype=np.float64)
    calibrated = calibration.scores(raw)
    assert calibration.slope == pytest.approx(fit_platt(labels, raw).slope)
    points = metrics.operating_points(labels, calibrated)
    assert metadata["operating_points"] == {k: v["threshold"] for k, v in points.items()}
    raw_points = metrics.operating_points(labels, raw)
    assert metadata["calibration"]["raw_operating_points"] == {
        k: v["threshold"] for k, v in raw_points.items()}
    for name in ("balanced", "high_sensitivity"):
        before = raw >= raw_points[name]["threshold"]
        after = calibrated >= metadata["operating_points"][name]
        assert np.array_equal(before, after), name
        at = metadata["metrics"]["at_operating_points"][name]
        assert (at["tp"], at["fp"]) == (int((before & (labels == 1)).sum()),
                                        int((before & (labels == 0)).sum()))
    assert metrics.auc(labels, calibrated) == pytest.approx(metrics.auc(labels, raw))
    # Calibrated to MIAS's prevalence: the mean calibrated score is near it, the raw one is not.
    assert abs(float(calibrated.mean()) - float(labels.mean())) < 0.02
    assert abs(float(raw.mean()) - float(labels.mean())) > 0.2
    # The drift reference is on the scale the worker reports.
    assert metadata["reference_scores"] == reference_of_predictions(
        BUNDLE / "predictions.jsonl", calibration)

"""Scoring logic: aggregation rules and the heatmap's way back to the source grid.

The predictor here is a transparent stand-in whose heatmap is the oriented image itself, so the
test can see whether the flips applied for the model are undone exactly on the way back.
The real model's grid mapping is proved in test_model_bundle.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from pipelines.results import ModelIdentity
from pipelines.scoring import score_views
from pipelines.study import decode_view, select_views
from tests.spooled import spool_run
from tools.make_study import make_study


@dataclass(frozen=True)
class _Prediction:
    probability: float
    heatmap: np.ndarray


class _ImageAsHeatmap:
    """Heatmap = the oriented input, scaled to [0, 1]; probability fixed per call order."""

    identity = ModelIdentity("echo", "0", 0.5)
    last_timings_s: dict[str, float] = {}

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = probabilities
        self.seen: list[np.ndarray] = []

    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        self.seen = images
        out = []
        for image, probability in zip(images, self.probabilities, strict=True):
            scaled = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
            out.append(_Prediction(probability, scaled.astype(np.float32)))
        return out


def test_every_breast_reaches_the_model_chest_wall_left_and_heatmaps_come_back_aligned(
    tmp_path: Path,
) -> None:
    paths = make_study(tmp_path / "study", rows=200, cols=160, seed=9, lesions=["R-CC", "L-MLO"])
    run_dir = spool_run(tmp_path, paths)
    selected, skipped = select_views(run_dir)
    assert skipped == []
    views = [decode_view(s) for s in selected]
    predictor = _ImageAsHeatmap([0.1, 0.7, 0.2, 0.4])
    result, heatmaps = score_views(views, predictor, "1.2.3")
    for image in predictor.seen:
        columns = image.mean(axis=0)
        third = len(columns) // 3
        assert columns[:third].mean() > columns[-third:].mean(), "chest wall (tissue) on the left"
    for view, heatmap in zip(views, heatmaps, strict=True):
        source = dcmread(view.path).pixel_array.astype(np.float32)
        assert heatmap.shape == source.shape
        expected = (source - source.min()) / (source.max() - source.min())
        np.testing.assert_allclose(heatmap, expected, atol=1e-6)


def test_breast_is_max_of_its_views_and_exam_is_max_of_breasts(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", rows=64, cols=48, seed=10)
    views = [decode_view(s) for s in select_views(spool_run(tmp_path, paths))[0]]
    order = [v.entry.view_key for v in views]
    probabilities = {"R-CC": 0.1, "L-CC": 0.7, "R-MLO": 0.3, "L-MLO": 0.2}
    result, _ = score_views(views, _ImageAsHeatmap([probabilities[k] for k in order]), "1.2.3")
    assert result.breast_scores == {"R": 0.3, "L": 0.7}
    assert result.exam_score == 0.7
    assert result.missing_views == ()


def test_missing_views_are_named(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", views=["L-CC"], rows=64, cols=48, seed=11)
    views = [decode_view(s) for s in select_views(spool_run(tmp_path, paths))[0]]
    result, _ = score_views(views, _ImageAsHeatmap([0.5]), "1.2.3")
    assert result.missing_views == ("R-CC", "R-MLO", "L-MLO")
    assert result.breast_scores == {"L": 0.5}

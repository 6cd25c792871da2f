"""Reading a breast against the other one (`contralateral` in a bundle's metadata): the worker
pairs each view with the same view of the other breast of the study, and the score and the
heatmap cells move together, so a region mark and the image score never disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.model import apply_contralateral
from pipelines.study import contralateral_indices, predict_views

SPEC = {"weight": 0.5, "missing_other_logit": -2.0}


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


def test_score_and_cells_lose_half_the_other_breast_logit() -> None:
    probabilities = torch.tensor([0.8, 0.3, 0.6])
    heatmaps = torch.zeros(3, 1, 4, 4)
    heatmaps[0, 0, 1, 1] = 0.8
    heatmaps[1, 0, 2, 2] = 0.3
    heatmaps[2, 0, 0, 0] = 0.6
    adjusted, cells = apply_contralateral(probabilities, heatmaps, [1, 0, None], SPEC)
    expected = [_sigmoid(_logit(0.8) - 0.5 * _logit(0.3)),
                _sigmoid(_logit(0.3) - 0.5 * _logit(0.8)),
                _sigmoid(_logit(0.6) - 0.5 * -2.0)]
    assert adjusted.tolist() == pytest.approx(expected, abs=1e-5)
    # the peak cell of each image carries the image's adjusted score (max pooling)
    assert float(cells[0, 0, 1, 1]) == pytest.approx(expected[0], abs=1e-5)
    assert float(cells[1, 0, 2, 2]) == pytest.approx(expected[1], abs=1e-5)
    assert float(cells[2, 0, 0, 0]) == pytest.approx(expected[2], abs=1e-5)
    # order kept, monotone within an image
    assert float(cells[0].max()) == float(cells[0, 0, 1, 1])


@dataclass
class _Entry:
    laterality: str
    view: str


@dataclass
class _View:
    entry: _Entry
    pixels: np.ndarray
    pixel_spacing_mm: float | None = 0.1


def _views(keys: list[str]) -> list[Any]:
    return [_View(_Entry(*key.split("-")), np.zeros((8, 8), np.float32)) for key in keys]


def test_each_view_is_paired_with_the_same_view_of_the_other_breast() -> None:
    views = _views(["R-CC", "L-CC", "R-MLO", "L-MLO"])
    assert contralateral_indices(views) == [1, 0, 3, 2]
    assert contralateral_indices(_views(["R-CC", "L-MLO", "R-MLO"])) == [None, 2, 1]


class _Recorder:
    """A predictor that records what the worker hands it (the real runner is tested above and
    in test_model_bundle.py)."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self.calls: list[dict[str, Any]] = []

    def predict(self, images: list[np.ndarray], views: list[str] | None = None,
                pixel_spacings: list[float | None] | None = None,
                contralateral: list[int | None] | None = None) -> list[str]:
        self.calls.append({"views": views, "pixel_spacings": pixel_spacings,
                           "contralateral": contralateral})
        return ["x"] * len(images)


def test_the_worker_feeds_views_spacings_and_pairs_only_to_bundles_that_declare_them() -> None:
    views = _views(["R-CC", "L-CC", "R-MLO", "L-MLO"])
    canvas = {"input": {"pixel_spacing_mm": 0.4}}
    plain = _Recorder({"input": {}})
    predict_views(plain, views)
    assert plain.calls == [{"views": None, "pixel_spacings": None, "contralateral": None}]
    single = _Recorder(canvas)
    predict_views(single, views)
    assert single.calls == [{"views": ["CC", "CC", "MLO", "MLO"], "pixel_spacings": [0.1] * 4,
                             "contralateral": None}]
    paired = _Recorder({**canvas, "contralateral": SPEC})
    predict_views(paired, views)
    assert paired.calls[0]["contralateral"] == [1, 0, 3, 2]

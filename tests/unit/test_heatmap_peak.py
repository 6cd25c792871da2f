"""A bundle whose heatmap peaks at the image's score keeps that promise on the source grid: a view
at or above the operating point always has a region at or above it (`lift_peak_to_score`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.findings import find_findings
from pipelines.model import HEATMAP_PEAK_KEY, lift_peak_to_score, load_bundle
from pipelines.preprocess import Placement
from pipelines.scoring import score_views
from tests.support.spooled import spooled_views
from tools.demo import DEMO_STUDY
from tools.stack.make_study import make_study

ROOT = Path(__file__).resolve().parents[2]


def _logit(x: np.ndarray) -> np.ndarray:
    return np.log(x) - np.log1p(-x)


def test_the_peak_is_raised_to_the_score_and_the_map_keeps_its_shape() -> None:
    heatmap = np.zeros((60, 50), np.float32)
    heatmap[10:40, 5:45] = np.linspace(0.05, 0.6, 40, dtype=np.float32)[None, :]
    before = heatmap.copy()
    placement = Placement(60, 50, 10, 40, 5, 45, 30, 40, 0.4)
    lifted = lift_peak_to_score(heatmap, 0.8, placement)
    assert lifted is heatmap  # in place
    assert float(lifted.max()) == pytest.approx(0.8, abs=1e-5)
    inside = before > 0
    assert np.array_equal(lifted > 0, inside)  # off the breast stays 0
    shift = _logit(lifted[inside].astype(np.float64)) - _logit(before[inside].astype(np.float64))
    assert np.allclose(shift, shift[0], atol=1e-3) and shift[0] > 0  # one shift for every pixel
    assert np.array_equal(np.argsort(lifted[inside]), np.argsort(before[inside]))


@pytest.mark.parametrize("probability", [0.3, 0.6, 0.0, 1.0])
def test_a_map_at_or_above_the_score_or_a_degenerate_score_is_left_alone(probability: float
                                                                         ) -> None:
    heatmap = np.zeros((20, 20), np.float32)
    heatmap[5:10, 5:10] = 0.6
    before = heatmap.copy()
    assert np.array_equal(lift_peak_to_score(heatmap, probability), before)
    empty = np.zeros((20, 20), np.float32)
    assert not lift_peak_to_score(empty, 0.7).any()


def test_every_flagged_view_of_the_demo_study_has_a_finding(tmp_path: Path) -> None:
    """The demo's study once came out with L-CC at 0.49 (balanced point 0.42) and its heatmap's
    highest pixel at 0.35: the stride-16 map's peak cell sits next to the chest-wall edge, and
    bilinear pixels fall a logit short of it. With the lift every view's map peaks at its score."""
    runner = load_bundle(ROOT / "models" / "mias-baseline", "cpu")
    if runner.metadata["output"].get(HEATMAP_PEAK_KEY) != "score":
        pytest.skip("the shipped bundle's heatmap does not peak at its score")
    paths = make_study(tmp_path / "study", **DEMO_STUDY)
    views = spooled_views(tmp_path, paths)
    result, heatmaps = score_views(views, runner, "1.2.3")
    point = runner.identity.operating_point
    flagged = 0
    for score, heatmap in zip(result.views, heatmaps, strict=True):
        assert float(heatmap.max()) == pytest.approx(score.probability, abs=1e-4), score.view_key
        if score.probability >= point:
            flagged += 1
            assert find_findings(heatmap, point), score.view_key
        else:
            assert not find_findings(heatmap, point), score.view_key
    assert flagged >= 1

"""The cell-head network of `tools/model/cells.py`: heatmap modes, the heat head and the
score-aligned heatmap, and the export the worker runs on smaller boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.model.cells import (
    PEAKS,
    CellHeadModel,
    HeadSpec,
    LiteTrunk,
    export_canvas,
    heatmap_logits,
)


def _cells() -> tuple[torch.Tensor, torch.Tensor]:
    inside = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    inside[0, 0, :, :4] = True  # the breast touches the left (chest wall) edge
    logits = torch.arange(30, dtype=torch.float32).view(1, 1, 6, 5)
    return logits, inside


def test_raw_mode_is_the_head_on_every_breast_cell() -> None:
    logits, inside = _cells()
    values, allowed = heatmap_logits(logits, inside, "raw")
    assert torch.equal(values, logits) and torch.equal(allowed, inside)


def test_smoothing_averages_breast_neighbours_only() -> None:
    logits, inside = _cells()
    values, _ = heatmap_logits(logits, inside, "smooth3")
    # cell (2, 3): neighbours in rows 1-3, columns 2-3 are breast; column 4 is not
    expected = logits[0, 0, 1:4, 2:4].mean()
    assert float(values[0, 0, 2, 3]) == pytest.approx(float(expected))
    # a cell away from every edge is the plain 3x3 mean
    assert float(values[0, 0, 2, 1]) == pytest.approx(float(logits[0, 0, 1:4, 0:3].mean()))


def test_erosion_drops_the_skin_line_but_not_the_canvas_edge() -> None:
    logits, inside = _cells()
    _, allowed = heatmap_logits(logits, inside, "erode")
    assert not bool(allowed[0, 0, :, 3].any())  # next to non-breast cells
    assert bool(allowed[0, 0, :, 0].all())      # the chest wall, on the canvas edge
    assert not bool(allowed[0, 0, :, 4].any())


def test_erosion_keeps_a_breast_too_small_to_erode() -> None:
    inside = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    inside[0, 0, 2, 2] = True
    _, allowed = heatmap_logits(torch.zeros(1, 1, 6, 5), inside, "smooth3-erode")
    assert torch.equal(allowed, inside)


def test_every_mode_keeps_the_heatmap_on_the_breast() -> None:
    logits, inside = _cells()
    for peak in PEAKS:
        _, allowed = heatmap_logits(logits, inside, peak)
        assert not bool((allowed & ~inside).any())


CANVAS = (256, 192)
CHANNELS = {"16": 112 + 320, "16c": 2 * (112 + 320), "32": 320 + 112}


def _head(level: str, seed: int) -> HeadSpec:
    rng = np.random.default_rng(seed)
    return HeadSpec(level, rng.normal(0, 0.05, CHANNELS[level]).astype(np.float32), -1.0)


def _breast(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, *CANVAS)
    x[:, :, :200, :120] = 0.1 + 0.9 * torch.rand(n, 1, 200, 120, generator=generator)
    return x


@pytest.fixture(scope="module")
def trunk() -> LiteTrunk:
    return LiteTrunk("efficientnet-lite0").for_inference()


@pytest.mark.parametrize(("score", "heat", "peak"), [("16", None, "raw"), ("16c", "32", "erode"),
                                                     ("32", "16", "smooth3")])
def test_heatmap_peaks_at_the_image_score_and_stays_on_the_breast(trunk, score, heat, peak) -> None:
    model = CellHeadModel(trunk, _head(score, 0), "top3", peak,
                          None if heat is None else _head(heat, 1))
    x = _breast(2)
    with torch.inference_mode():
        probability, heatmap = model(x)
    assert heatmap.shape == (2, 1, *CANVAS)
    for i in range(2):
        # bilinear upsampling never overshoots a cell, and the peak cell carries the score
        assert float(heatmap[i].max()) <= float(probability[i]) + 1e-5
        assert float(heatmap[i].max()) >= 0.5 * float(probability[i])
        assert float(heatmap[i, 0, 232:, :].max()) == 0.0  # below the breast's last cells
        assert float(heatmap[i, 0, :, 152:].max()) == 0.0


def test_the_unfolded_and_folded_trunks_agree() -> None:
    x = _breast(1)
    with torch.inference_mode():
        plain = LiteTrunk("efficientnet-lite0")(x)
        folded = LiteTrunk("efficientnet-lite0").for_inference()(x)
    for a, b in zip(plain, folded, strict=True):
        assert torch.allclose(a, b, atol=2e-3)


def test_export_runs_on_smaller_boxes_like_the_network(trunk) -> None:
    model = CellHeadModel(trunk, _head("16c", 2), "top10", "smooth3-erode", _head("32", 3))
    program = export_canvas(model, CANVAS)
    x = _breast(1)[:, :, :224, :160].contiguous()
    with torch.inference_mode():
        for expected, got in zip(model(x), program.module()(x), strict=True):
            assert expected.shape == got.shape
            assert torch.allclose(expected, got, atol=1e-4)

"""The physical canvas of `pipelines/preprocess.py`: breast crop, fixed mm per pixel, and the way
back, so a canvas heatmap lands on the source pixels it came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.model import heatmap_to_image_grid
from pipelines.preprocess import Placement, canvas_input, uses_canvas

METADATA = {"input": {
    "height": 768, "width": 512, "channels": 1, "orientation": "chest_wall_left",
    "pixel_spacing_mm": 0.4, "assumed_pixel_spacing_mm": 0.2, "crop_margin_mm": 2.0,
    "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5},
}}


def synthetic_breast(rows: int, cols: int, spacing: float, blob_mm: tuple[float, float],
                     background: float = 0.0) -> np.ndarray:
    """A half-ellipse breast against the left edge (160 x 90 mm), a dense 8 mm blob inside it
    at `blob_mm` (row, column in mm from the top-left corner of the image)."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32) * spacing
    centre_row = rows * spacing / 2
    inside = ((yy - centre_row) / 80.0) ** 2 + (xx / 90.0) ** 2 <= 1.0
    rng = np.random.default_rng(0)
    image = np.where(inside, 900.0 + 60.0 * rng.standard_normal((rows, cols)), background)
    blob = (yy - blob_mm[0]) ** 2 + (xx - blob_mm[1]) ** 2 <= 4.0 ** 2
    image[blob & inside] = 2000.0
    return image.astype(np.float32)


def test_old_bundles_have_no_canvas() -> None:
    assert uses_canvas(METADATA)
    assert not uses_canvas({"input": {"height": 384, "width": 384}})


@pytest.mark.parametrize(("rows", "cols", "spacing"), [(1024, 1024, 0.2), (2294, 1914, 0.1),
                                                       (4096, 3328, 0.07)])
def test_breast_is_resampled_to_the_declared_pixel_size(rows: int, cols: int, spacing: float) -> None:
    """The same breast (160 mm tall) spans the same canvas rows whatever the detector pixel."""
    image = synthetic_breast(rows, cols, spacing, (rows * spacing / 2, 40.0))
    canvas, placement, mask = canvas_input(image, METADATA, "CC", spacing)
    assert tuple(canvas.shape) == (1, 768, 512)
    assert placement.spacing_mm == pytest.approx(0.4)
    # 160 x 90 mm and a 2 mm margin each side (one side only at the image's left edge), at
    # 0.4 mm, within 5 mm (the mask is found on a smoothed, reduced copy)
    assert placement.height == pytest.approx(164 / 0.4, abs=12)
    assert placement.width == pytest.approx(92 / 0.4, abs=12)
    # 0 off the breast and on the padding; the breast windowed into [0, 1]
    assert float(canvas[0, placement.height:].abs().max()) == 0.0
    assert float(canvas[0, :, placement.width:].abs().max()) == 0.0
    assert 0.0 <= float(canvas.min()) and float(canvas.max()) == pytest.approx(1.0)
    assert mask.shape == image.shape and mask.dtype == bool


def test_a_breast_larger_than_the_canvas_is_shrunk_to_fit() -> None:
    image = synthetic_breast(4096, 3328, 0.2, (400.0, 40.0))  # 160 mm breast at 0.2 mm: fits
    big = np.repeat(np.repeat(image, 1, 0), 1, 1)
    canvas, placement, _ = canvas_input(big, METADATA, "CC", 0.1)  # claimed 0.1 mm: small
    assert placement.height <= 768 and placement.width <= 512
    canvas, placement, _ = canvas_input(big, METADATA, "CC", 0.5)  # 0.5 mm: 400 mm tall
    assert placement.height == 768 or placement.width == 512
    assert placement.spacing_mm > 0.4


@pytest.mark.parametrize(("rows", "cols", "spacing"), [(1024, 1024, 0.2), (4096, 3328, 0.07)])
def test_canvas_heatmap_maps_back_onto_the_blob(rows: int, cols: int, spacing: float) -> None:
    """The blob's brightest canvas cell, as a heatmap, lands on the blob in the source image."""
    blob_mm = (rows * spacing / 2 + 20.0, 50.0)
    image = synthetic_breast(rows, cols, spacing, blob_mm)
    canvas, placement, mask = canvas_input(image, METADATA, "CC", spacing)
    smooth = torch.nn.functional.avg_pool2d(canvas[None], 9, 1, 4)[0, 0]
    heatmap = torch.zeros(768, 512)
    r, c = np.unravel_index(int(torch.argmax(smooth)), smooth.shape)
    heatmap[r, c] = 1.0
    heatmap = torch.nn.functional.max_pool2d(heatmap[None, None], 9, 1, 4)[0, 0]
    mapped = heatmap_to_image_grid(heatmap, rows, cols, None, placement)
    assert mapped.shape == (rows, cols)
    peak_row, peak_col = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
    assert abs(peak_row * spacing - blob_mm[0]) <= 4.0
    assert abs(peak_col * spacing - blob_mm[1]) <= 4.0
    assert mask[peak_row, peak_col]
    # nothing lands outside the crop box
    outside = np.ones((rows, cols), bool)
    outside[placement.top:placement.bottom, placement.left:placement.right] = False
    assert float(mapped[outside].max(initial=0.0)) == 0.0


def test_point_to_canvas_inverts_to_source() -> None:
    placement = Placement(1000, 800, 100, 900, 50, 450, 400, 200, 0.4)
    x, y = placement.point_to_canvas(250.0, 500.0)
    assert (x, y) == pytest.approx(((250.5 - 50) * 0.5 - 0.5, (500.5 - 100) * 0.5 - 0.5))
    heatmap = torch.zeros(768, 512)
    heatmap[int(round(y)), int(round(x))] = 1.0
    back = placement.to_source(heatmap)
    row, col = np.unravel_index(int(torch.argmax(back)), tuple(back.shape))
    assert abs(row - 500) <= 2 and abs(col - 250) <= 2


def test_quantile_matching_gives_the_reference_distribution_and_keeps_the_order() -> None:
    from pipelines.preprocess import breast_quantiles, match_quantiles

    rng = np.random.default_rng(3)
    values = torch.from_numpy(rng.beta(5.0, 2.0, 20_000).astype(np.float32))  # bright, skewed
    reference = np.linspace(0.0, 1.0, 101) ** 2  # dark, the other way
    matched = match_quantiles(values, reference)
    assert np.allclose(breast_quantiles(matched, 101)[5:96], reference[5:96], atol=0.01)
    order = np.argsort(values.numpy(), kind="stable")
    assert np.all(np.diff(matched.numpy()[order]) >= 0)  # a monotone map: the ranks stay
    # ties share one value (a clipped window's zeros stay one grey)
    tied = match_quantiles(torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0]), reference)
    assert tied[0] == tied[1] == tied[2] < tied[3] < tied[4]
    with pytest.raises(ValueError):
        match_quantiles(values, [0.5, 0.2, 0.9])


def test_a_declared_reference_is_matched_inside_the_breast_only() -> None:
    from copy import deepcopy

    from pipelines.preprocess import breast_quantiles, windowed_breast

    image = synthetic_breast(1024, 1024, 0.2, (102.4, 40.0))
    plain, placement, _ = canvas_input(image, METADATA, "CC", 0.2)
    _, inside, _, _ = windowed_breast(image, METADATA, "CC", 0.2)
    matched_metadata = deepcopy(METADATA)
    reference = [round(float(v), 6) for v in np.linspace(0.0, 1.0, 101) ** 3]
    matched_metadata["input"]["intensity"]["reference_quantiles"] = reference
    matched, same_placement, _ = canvas_input(image, matched_metadata, "CC", 0.2)
    assert same_placement == placement
    content = matched[0, :placement.height, :placement.width]
    assert float(content[~inside].abs().max()) == 0.0
    assert float(matched[0, placement.height:].abs().max()) == 0.0
    quantiles = breast_quantiles(content[inside], 101)
    assert np.allclose(quantiles[10:91], reference[10:91], atol=0.02)
    assert not np.allclose(quantiles[10:91],
                           breast_quantiles(plain[0, :placement.height, :placement.width][inside],
                                            101)[10:91], atol=0.02)

"""The worker runs a physical-canvas network on the breasts' box only (`input.content_box`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from node.bundle import LEGACY_SHA_KEY, file_sha256
from node.errors import ModelError
from pipelines.model import content_box, load_bundle
from pipelines.preprocess import Placement

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "mias-baseline"
BOX = {"multiple": 32, "context_px": 64, "min_px": 128}


def _metadata(box: dict[str, int] | None) -> dict[str, object]:
    spec: dict[str, object] = {"height": 768, "width": 512, "pixel_spacing_mm": 0.4}
    if box is not None:
        spec["content_box"] = box
    return {"input": spec}


def _placement(height: int, width: int) -> Placement:
    return Placement(1000, 800, 0, 1000, 0, 800, height, width)


def test_without_content_box_the_whole_canvas_is_run() -> None:
    assert content_box(_metadata(None), _placement(100, 100)) == (768, 512)


@pytest.mark.parametrize(("size", "expected"), [
    ((300, 200), (384, 288)),  # content + 64 px, rounded up to 32
    ((20, 10), (128, 128)),    # never below min_px
    ((760, 500), (768, 512)),  # never beyond the canvas
    ((704, 448), (768, 512)),  # exactly the canvas
])
def test_box_holds_the_content_region_plus_context(size, expected) -> None:
    assert content_box(_metadata(BOX), _placement(*size)) == expected


def test_a_whole_image_bundle_is_never_cropped() -> None:
    assert content_box(_metadata(BOX), None) == (768, 512)


def _shipped_box() -> bool:
    return "content_box" in json.loads((BUNDLE / "metadata.json").read_text())["input"]


@pytest.mark.skipif(not _shipped_box(), reason="the shipped bundle runs on the whole canvas")
def test_small_breast_scores_on_its_box_like_on_the_canvas(tmp_path: Path) -> None:
    """The same bundle with and without `content_box`: a small breast's score and heatmap move by
    no more than the far padding's reach explains, the heatmap keeps its shape and its peak."""
    full = tmp_path / "full"
    shutil.copytree(BUNDLE, full)
    metadata = json.loads((full / "metadata.json").read_text())
    del metadata["input"]["content_box"]
    (full / "metadata.json").write_text(json.dumps(metadata))
    rng = np.random.default_rng(3)
    rows, cols = 1400, 1100  # 0.2 mm: 280 x 220 mm, breast half-ellipse of 120 x 70 mm
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32) * 0.2
    inside = ((yy - 140.0) / 60.0) ** 2 + (xx / 70.0) ** 2 <= 1.0
    image = np.where(inside, 900.0 + 80.0 * rng.standard_normal((rows, cols)), 30.0)
    image[((yy - 130.0) ** 2 + (xx - 30.0) ** 2 <= 36.0) & inside] = 1800.0
    cropped, whole = load_bundle(BUNDLE, "cpu"), load_bundle(full, "cpu")
    a = cropped.predict([image.astype(np.float32)], ["MLO"], [0.2])[0]
    b = whole.predict([image.astype(np.float32)], ["MLO"], [0.2])[0]
    assert a.heatmap.shape == b.heatmap.shape == (rows, cols)
    # the trunk's receptive field reaches the far padding (measured: 0.026 apart, calibrated
    # scale); the box is what the features were trained on, the canvas is the approximation
    assert abs(a.probability - b.probability) < 0.05
    assert float(np.abs(a.heatmap - b.heatmap).max()) < 0.05
    assert np.unravel_index(np.argmax(a.heatmap), a.heatmap.shape) == np.unravel_index(
        np.argmax(b.heatmap), b.heatmap.shape)
    # a view's answer does not depend on the other views of its batch (each on its own box)
    large = np.pad(image, ((0, 600), (0, 400)), mode="edge")
    together = cropped.predict([image.astype(np.float32), large.astype(np.float32)],
                               ["MLO", "MLO"], [0.2, 0.2])
    assert together[0].probability == a.probability
    assert np.array_equal(together[0].heatmap, a.heatmap)


class _FixedSize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = torch.sigmoid(torch.nn.functional.avg_pool2d(x, 16))
        heatmap = torch.nn.functional.interpolate(cells, size=(768, 512), mode="bilinear")
        return cells.flatten(1).mean(1), heatmap


def test_a_network_exported_for_the_canvas_only_cannot_claim_content_box(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    program = torch.export.export(_FixedSize(), (torch.zeros(1, 1, 768, 512),))
    torch.export.save(program, str(bundle / "model.pt2"))
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["input"]["content_box"] = BOX
    metadata["model_sha256"] = file_sha256(bundle / "model.pt2")
    metadata.pop(LEGACY_SHA_KEY, None)
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="content_box"):
        load_bundle(bundle, "cpu")


@pytest.mark.parametrize("box", [{"multiple": 48, "context_px": 64}, {"multiple": 32},
                                 {"multiple": 32, "context_px": 64, "min_px": 1024}])
def test_content_box_that_does_not_fit_the_canvas_is_refused(tmp_path: Path, box) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["input"]["content_box"] = box
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="content_box"):
        load_bundle(bundle, "cpu")

"""The evaluation tool scores a PNG exactly as the worker scores a DICOM of the same pixels.

The numbers in an evaluation report only describe the deployed node if both paths agree: same
pixel values, same orientation (the right breast is mirrored chest wall left on both paths), same
preprocessing (at the same pixel size: the PNG's manifest record states the spacing the DICOM
header gives), same model, and the heatmap back on the source grid with the same flips undone.
The DICOM goes through the worker's own functions (pipelines.study select/decode/orient and
pipelines.scoring.score_views, as process_run calls them); the PNG through
tools.model.evaluate.score_record. 8-bit and 16-bit, a left and a right breast, CC and MLO, and
both breasts of one view read against each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.model import ModelRunner, load_bundle
from pipelines.quality import pixel_spacing_of
from pipelines.scoring import score_views
from pipelines.study import decode_view, select_views
from tests.support.spooled import spool_datasets
from tests.support.study_pixels import replace_pixels
from tools.model.dataset import Record
from tools.model.evaluate import counterparts, score_record
from tools.stack.make_study import StudySpec, build_view_dataset, encode_dataset, render_breast

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"
ROWS, COLS = 560, 448  # not square and not the model size, so resizing and flips both matter
VIEWS = ("R-MLO", "L-CC")
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return load_bundle(BUNDLE, "cpu")


def _pixels(view_key: str, bits: int, seed: int) -> np.ndarray:
    """A breast-like image with a bright lesion, chest wall on the side DICOM puts it."""
    twelve_bit = render_breast(ROWS, COLS, view_key, np.random.default_rng(seed), lesion=True)
    if bits == 8:
        return (twelve_bit.astype(np.uint32) * 255 // 4095).astype(np.uint8)
    return (twelve_bit.astype(np.uint32) * 65535 // 4095).astype(np.uint16)


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), pixels), "the PNG must hold exactly these pixels"
    return path


def _study_of(tmp_path: Path, view_keys: tuple[str, ...], bits: int, seeds: tuple[int, ...],
              study_seed: int) -> tuple[Path, dict[str, Record]]:
    """The views as a spooled DICOM study (the worker's input) and as PNG manifest records of
    the same pixels (the evaluation tool's), one woman: the run folder and the records."""
    spec = StudySpec(views=view_keys, rows=ROWS, cols=COLS, seed=study_seed)
    datasets, records = [], {}
    for view_key, seed in zip(view_keys, seeds, strict=True):
        pixels = _pixels(view_key, bits, seed=seed)
        ds = build_view_dataset(spec, view_key)
        replace_pixels(ds, pixels)
        encode_dataset(ds, "explicit")
        datasets.append(ds)
        laterality, view = view_key.split("-")
        records[view_key] = Record(
            id=view_key, image=_write_png(tmp_path / f"{view_key}.png", pixels), group="w1",
            laterality=laterality, view=view, label=1, malignant=None,
            chest_wall="right" if laterality == "R" else "left",
            pixel_spacing_mm=pixel_spacing_of(ds),  # a manifest states it, as a header does
        )
    run_dir = tmp_path / "run"
    spool_datasets(run_dir, datasets)
    return run_dir, records


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("bits", [8, 16])
def test_png_and_dicom_of_the_same_pixels_score_the_same(
    tmp_path: Path, runner: ModelRunner, bits: int
) -> None:
    run_dir, records = _study_of(tmp_path, VIEWS, bits, (0, 1), bits)

    selected, skipped = select_views(run_dir)
    assert skipped == []
    views = [decode_view(s) for s in selected]
    assert {v.entry.view_key for v in views} == set(VIEWS)
    flips = {v.entry.view_key: v.orientation.flip_columns for v in views}
    assert flips == {"R-MLO": True, "L-CC": False}, "the right breast is mirrored, the left not"
    result, heatmaps = score_views(views, runner, "1.2.3")

    for view, score, heatmap in zip(views, result.views, heatmaps, strict=True):
        key = view.entry.view_key
        png = score_record(runner, records[key])
        assert heatmap.shape == png.heatmap.shape == (ROWS, COLS)
        assert abs(score.probability - png.probability) <= TOLERANCE, (
            f"{key} {bits}-bit: worker {score.probability!r} vs evaluation {png.probability!r}")
        assert np.abs(heatmap - png.heatmap).max() <= TOLERANCE, f"{key} {bits}-bit heatmaps"
        # Not vacuous: the map has structure, and it is not symmetric under the flip we undo.
        assert float(heatmap.max()) > float(heatmap.min())
        assert not np.allclose(heatmap, heatmap[:, ::-1], atol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_cc_stored_lateral_side_down_is_turned_the_same_way(
    tmp_path: Path, runner: ModelRunner
) -> None:
    """PatientOrientation P\\R on a right CC: lateral side down, so the worker also flips the rows;
    the PNG record says so with flip_rows. Both flips, same score, same heatmap."""
    spec = StudySpec(views=("R-CC",), rows=ROWS, cols=COLS, seed=3)
    pixels = np.ascontiguousarray(_pixels("R-CC", 16, seed=5)[::-1])
    ds = build_view_dataset(spec, "R-CC")
    ds.PatientOrientation = ["P", "R"]
    replace_pixels(ds, pixels)
    encode_dataset(ds, "explicit")
    spool_datasets(tmp_path / "run", [ds])
    record = Record(id="R-CC", image=_write_png(tmp_path / "r-cc.png", pixels), group="w1",
                    laterality="R", view="CC", label=0, malignant=None, chest_wall="right",
                    flip_rows=True, pixel_spacing_mm=pixel_spacing_of(ds))
    selected, _ = select_views(tmp_path / "run")
    views = [decode_view(s) for s in selected]
    assert (views[0].orientation.flip_columns, views[0].orientation.flip_rows) == (True, True)
    result, heatmaps = score_views(views, runner, "1.2.3")
    png = score_record(runner, record)
    assert abs(result.views[0].probability - png.probability) <= TOLERANCE
    assert np.abs(heatmaps[0] - png.heatmap).max() <= TOLERANCE
    assert not np.allclose(heatmaps[0], heatmaps[0][::-1], atol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_both_breasts_of_a_view_are_read_against_each_other_on_both_paths(
    tmp_path: Path, runner: ModelRunner
) -> None:
    """R-MLO and L-MLO of one woman: the worker reads each against the other (the bundle's
    `contralateral` block); the evaluation tool, given each film's counterpart, must give the
    same scores and heatmaps, and without it a different score (read against the training
    films' mean instead): so the pairing is what makes the two paths agree."""
    if runner.metadata.get("contralateral") is None:
        pytest.skip("the bundle reads each breast on its own")
    run_dir, records = _study_of(tmp_path, ("R-MLO", "L-MLO"), 16, (10, 11), 7)
    selected, _ = select_views(run_dir)
    views = [decode_view(s) for s in selected]
    result, heatmaps = score_views(views, runner, "1.2.3")
    pairs = counterparts(list(records.values()))
    assert {k: v.id for k, v in pairs.items()} == {"R-MLO": "L-MLO", "L-MLO": "R-MLO"}
    for view, score, heatmap in zip(views, result.views, heatmaps, strict=True):
        key = view.entry.view_key
        png = score_record(runner, records[key], pairs[key])
        assert abs(score.probability - png.probability) <= TOLERANCE, key
        assert np.abs(heatmap - png.heatmap).max() <= TOLERANCE, key
        alone = score_record(runner, records[key])
        assert abs(alone.probability - png.probability) > 1e-4, key

"""The heatmap SEG: on the exact grid of its source, valid for dciodvfy, readable by highdicom."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless

from pipelines.results import ModelIdentity, OutputSpec
from pipelines.seg import build_seg, read_seg_heatmap
from tests.support.dciodvfy import assert_dciodvfy_clean, to_bytes
from tools.stack.make_study import FULL_COLS, FULL_ROWS, make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

MODEL = ModelIdentity("mias-baseline", "0.1.0", operating_point=0.5)
SPEC = OutputSpec(9902, "AI suspicion heatmap")
QUANTUM = 0.5 / 255 + 1e-6  # fractional values are stored as round(p * 255)

# dciodvfy warnings we keep, each with its reason. Any other warning fails the tests.
ALLOWED_WARNINGS: set[str] = set()  # none: the SEG is clean


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    paths = make_study(tmp_path_factory.mktemp("study"), rows=256, cols=208, seed=22)
    return {p.stem: dcmread(p, stop_before_pixels=True) for p in paths}


def _heatmap(source: Dataset, seed: int = 0, noise: float = 0.2) -> np.ndarray:
    """A smooth blob (the kind of map the model gives) plus noise, so every level is exercised."""
    rows, cols = int(source.Rows), int(source.Columns)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    blob = np.exp(-((yy - rows / 3) ** 2 + (xx - cols / 4) ** 2) / (2 * (rows / 10) ** 2))
    speckle = np.random.default_rng(seed).random((rows, cols), dtype=np.float32)
    return np.clip((1 - noise) * blob + noise * speckle, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("view_key", ["R-CC", "L-CC", "R-MLO", "L-MLO"])
def test_round_trip_keeps_the_heatmap_and_passes_dciodvfy(
    sources: dict[str, Dataset], tmp_path: Path, view_key: str
) -> None:
    source = sources[view_key]
    heatmap = _heatmap(source)
    data = to_bytes(build_seg(source, heatmap, MODEL, SPEC))
    back = read_seg_heatmap(dcmread(io.BytesIO(data)))
    assert back.shape == heatmap.shape and back.dtype == np.float32
    assert np.abs(back - heatmap).max() <= QUANTUM
    assert_dciodvfy_clean(data, tmp_path / f"seg-{view_key}.dcm", ALLOWED_WARNINGS)


def test_highdicom_reads_it_back(sources: dict[str, Dataset]) -> None:
    source = sources["L-MLO"]
    heatmap = _heatmap(source, seed=1)
    seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(source, heatmap, MODEL, SPEC))))
    assert seg.number_of_segments == 1
    description = seg.get_segment_description(1)
    assert description.segmented_property_category.value == "49755003"  # Morph. abnormal struct.
    assert description.segmented_property_type.value == "52988006"  # Lesion
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = description.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)
    [(_, _, source_uid)] = seg.get_source_image_uids()
    assert source_uid == source.SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([source_uid], segment_numbers=[1])
    assert np.abs(pixels[0, :, :, 0] - heatmap).max() <= QUANTUM


def test_header_describes_the_source_geometry(sources: dict[str, Dataset]) -> None:
    source = sources["R-MLO"]
    seg = dcmread(io.BytesIO(to_bytes(build_seg(source, _heatmap(source), MODEL, SPEC))))
    assert seg.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert seg.MaximumFractionalValue == 255
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber",
                    "PatientOrientation"):
        assert seg[keyword].value == source[keyword].value, keyword
    assert (seg.SeriesNumber, seg.SeriesDescription) == (9902, "AI suspicion heatmap")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in source.PixelSpacing]
    assert float(measures.SliceThickness) == float(source.BodyPartThickness)
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    derived_from = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derived_from.ReferencedSOPInstanceUID == source.SOPInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID)


def test_source_without_thickness_still_gives_a_clean_readable_seg(
    sources: dict[str, Dataset], tmp_path: Path
) -> None:
    source = Dataset()
    source.update(sources["R-CC"])
    del source.BodyPartThickness
    heatmap = _heatmap(source, seed=2)
    data = to_bytes(build_seg(source, heatmap, MODEL, SPEC))
    assert np.abs(read_seg_heatmap(dcmread(io.BytesIO(data))) - heatmap).max() <= QUANTUM
    assert_dciodvfy_clean(data, tmp_path / "seg-no-thickness.dcm", ALLOWED_WARNINGS)


def test_uids_depend_on_source_and_model_only(sources: dict[str, Dataset]) -> None:
    source = sources["L-CC"]
    heatmap = _heatmap(source)
    first = build_seg(source, heatmap, MODEL, SPEC)
    again = build_seg(source, _heatmap(source, seed=3), MODEL, SPEC)
    newer = build_seg(source, heatmap, ModelIdentity("mias-baseline", "0.2.0", 0.5), SPEC)
    other_view = build_seg(sources["R-CC"], heatmap, MODEL, SPEC)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                               again.SeriesInstanceUID)
    assert first.SOPInstanceUID not in {newer.SOPInstanceUID, other_view.SOPInstanceUID}
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SeriesInstanceUID == other_view.SeriesInstanceUID  # one series per run


def test_heatmap_must_match_the_source_grid(sources: dict[str, Dataset]) -> None:
    source = sources["R-CC"]
    heatmap = _heatmap(source)
    for wrong in (heatmap[:-1], heatmap.T, heatmap[None]):  # cropped, transposed, batched
        with pytest.raises(ValueError, match="Rows x Columns"):
            build_seg(source, wrong, MODEL, SPEC)
    with pytest.raises(ValueError, match="NaN"):
        build_seg(source, np.full_like(heatmap, np.nan), MODEL, SPEC)


def test_full_size_seg_is_clean_and_exact(tmp_path: Path) -> None:
    [path] = make_study(tmp_path / "full", views=["L-CC"], rows=FULL_ROWS, cols=FULL_COLS,
                        seed=23)
    source = dcmread(path, stop_before_pixels=True)
    heatmap = _heatmap(source, noise=0.0)  # smooth, like an upsampled model heatmap
    data = to_bytes(build_seg(source, heatmap, MODEL, SPEC))
    assert len(data) < 2**20  # compressed: the uncompressed frame alone is 13.6 MB
    back = read_seg_heatmap(dcmread(io.BytesIO(data)))
    assert back.shape == (FULL_ROWS, FULL_COLS)
    assert np.abs(back - heatmap).max() <= QUANTUM
    assert_dciodvfy_clean(data, tmp_path / "seg-full.dcm", ALLOWED_WARNINGS)

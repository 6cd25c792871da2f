"""The heatmap SEGs: binary (the findings, the default) and fractional (the full map), on the exact
grid of their source, clean for dciodvfy and pixelmed, readable by highdicom, with what OHIF's SEG
loader needs on a 2-D mammogram."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from node.version import software_version
from pipelines.attribution import series_description
from pipelines.findings import find_findings
from pipelines.results import ModelIdentity, OutputSpec
from pipelines.seg import (
    NOMINAL_ORIENTATION,
    NOMINAL_POSITION,
    build_binary_seg,
    build_seg,
    read_seg_heatmap,
    read_seg_regions,
)
from tests.support.dciodvfy import assert_dciodvfy_clean, to_bytes
from tests.support.pixelmed import assert_pixelmed_clean
from tools.stack.make_study import FULL_COLS, FULL_ROWS, make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

MODEL = ModelIdentity("mias-baseline", "0.1.0", operating_point=0.5)
SPEC = OutputSpec(9902, "AI suspicion heatmap")
REGIONS = OutputSpec(9902, "AI suspicious regions", software_version="9.9.9")
QUANTUM = 0.5 / 255 + 1e-6  # fractional values are stored as round(p * 255)

# dciodvfy warnings we keep, each with its reason. Any other warning fails the tests.
ALLOWED_WARNINGS: set[str] = set()  # none: the SEGs are clean
# pixelmed warnings we keep, each with its reason.
PIXELMED_ALLOWED = {
    "Unrecognized defined term :ISO_IR 192:": (
        "Specific Character Set is copied from the source; ISO_IR 192 (UTF-8) is a defined term "
        "of PS3.3 C.12.1.1.2 that this pixelmed release does not list"),
}


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


def _two_blobs(source: Dataset) -> np.ndarray:
    """Two separate suspicious regions and a weak one below the operating point."""
    heatmap = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    heatmap[40:70, 30:60] = 0.9
    heatmap[150:170, 120:150] = 0.6
    heatmap[200:230, 20:50] = 0.3
    return heatmap


@pytest.fixture(scope="module")
def binary(sources: dict[str, Dataset]) -> tuple[Dataset, np.ndarray, bytes]:
    source = sources["L-MLO"]
    heatmap = _two_blobs(source)
    data = to_bytes(build_binary_seg(source, find_findings(heatmap, MODEL.operating_point),
                                     MODEL, REGIONS))
    return source, heatmap, data


@pytest.mark.slow
@pytest.mark.requires_bin("java")
def test_each_kind_is_clean_for_pixelmed(sources: dict[str, Dataset],
                                         binary: tuple[Dataset, np.ndarray, bytes],
                                         tmp_path: Path) -> None:
    """One object of each kind through pixelmed's DicomInstanceValidator (2-15 s each)."""
    source = sources["R-CC"]
    empty = build_binary_seg(source, (), MODEL, REGIONS)
    fractional = build_seg(source, _heatmap(source), MODEL, SPEC)
    (tmp_path / "binary.dcm").write_bytes(binary[2])
    for dataset_or_path in (tmp_path / "binary.dcm", empty, fractional):
        assert_pixelmed_clean(dataset_or_path, PIXELMED_ALLOWED)


def test_binary_seg_is_the_findings_and_passes_dciodvfy(
    binary: tuple[Dataset, np.ndarray, bytes], tmp_path: Path
) -> None:
    source, heatmap, data = binary
    seg = dcmread(io.BytesIO(data))
    regions = read_seg_regions(seg)
    assert regions.shape == heatmap.shape and regions.dtype == np.bool_
    assert np.array_equal(regions, heatmap >= MODEL.operating_point)  # both blobs, not the weak one
    assert (seg.SegmentationType, seg.file_meta.TransferSyntaxUID) == ("BINARY",
                                                                      ExplicitVRLittleEndian)
    assert seg.ContentDescription == "2 region(s) at or above 0.5"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "operating_point=0.5" in algorithm.AlgorithmParameters
    assert_dciodvfy_clean(data, tmp_path / "seg-binary.dcm", ALLOWED_WARNINGS)
    with pytest.raises(ValueError, match="not a fractional SEG"):
        read_seg_heatmap(seg)


def test_image_without_finding_gets_an_empty_segment(sources: dict[str, Dataset],
                                                     tmp_path: Path) -> None:
    source = sources["R-MLO"]
    findings = find_findings(np.full((256, 208), 0.4, np.float32), MODEL.operating_point)
    assert findings == ()
    data = to_bytes(build_binary_seg(source, findings, MODEL, REGIONS))
    seg = dcmread(io.BytesIO(data))
    assert seg.NumberOfFrames == 1 and len(seg.SegmentSequence) == 1
    assert not read_seg_regions(seg).any()
    assert seg.ContentDescription == "no region at or above 0.5"
    assert_dciodvfy_clean(data, tmp_path / "seg-empty.dcm", ALLOWED_WARNINGS)


def test_what_ohif_and_both_validators_need_on_a_2d_mammogram(
    binary: tuple[Dataset, np.ndarray, bytes]
) -> None:
    source, _, data = binary
    seg = dcmread(io.BytesIO(data))
    shared = seg.SharedFunctionalGroupsSequence[0]
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    # OHIF's SEG loader needs Plane Orientation and Plane Position even without a Frame of
    # Reference; nominal values, as viewers assume for a projection image.
    assert "FrameOfReferenceUID" not in source
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == list(
        NOMINAL_ORIENTATION)
    assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == list(
        NOMINAL_POSITION)
    # The frame names its source image, which is how OHIF and highdicom place it.
    derived_from = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derived_from.ReferencedSOPInstanceUID == source.SOPInstanceUID
    # Laterality as Image Laterality (pixelmed wants laterality, dciodvfy refuses the
    # series-level one on a SEG); no Patient Orientation (pixelmed checks it with VM 1).
    assert seg.ImageLaterality == source.ImageLaterality == "L"
    assert "Laterality" not in seg and "PatientOrientation" not in seg


def test_labelled_and_attributed(binary: tuple[Dataset, np.ndarray, bytes],
                                 sources: dict[str, Dataset]) -> None:
    seg = dcmread(io.BytesIO(binary[2]))
    assert seg.SeriesDescription == "AI suspicious regions - research use only"
    [equipment] = seg.ContributingEquipmentSequence
    assert equipment.ManufacturerModelName == MODEL.name
    assert software_version() in equipment.SoftwareVersions
    assert f"model {MODEL.version}" in equipment.SoftwareVersions
    assert "Research use only, not for diagnosis" in equipment.ContributionDescription
    assert seg.SoftwareVersions == "9.9.9"
    fractional = build_seg(sources["R-CC"], _heatmap(sources["R-CC"]), MODEL, SPEC)
    assert fractional.SeriesDescription == "AI suspicion heatmap - research use only"
    assert fractional.ContributingEquipmentSequence[0].ManufacturerModelName == MODEL.name


@pytest.mark.requires_bin("dciodvfy")
def test_series_description_names_the_view_and_says_when_it_is_outside_the_domain(
        sources: dict[str, Dataset], tmp_path: Path) -> None:
    """Each SEG is its own series, and OHIF lists series by description, not the SR's text: the
    description is where a viewer shows which view a map is of and that the model was not
    trained on such an image, first, as OHIF's series list cuts the rest."""
    source = sources["L-CC"]
    found = find_findings(_two_blobs(source), MODEL.operating_point)
    inside = build_binary_seg(source, found, MODEL, REGIONS, "L-CC")
    outside = build_binary_seg(source, found, MODEL, REGIONS, "L-CC", ["pixel_spacing", "view"])
    fractional = build_seg(source, _heatmap(source), MODEL, SPEC, "L-CC", ["modality"])
    assert inside.SeriesDescription == "L-CC: AI suspicious regions - research use only"
    assert outside.SeriesDescription == ("L-CC outside domain: AI suspicious regions - research "
                                         "use only")
    assert fractional.SeriesDescription == ("L-CC outside domain: AI suspicion heatmap - research "
                                            "use only")
    # the same object otherwise: a caveat does not make it another instance
    assert outside.SOPInstanceUID == inside.SOPInstanceUID
    assert_dciodvfy_clean(to_bytes(outside), tmp_path / "outside.dcm", ALLOWED_WARNINGS)


def test_a_long_configured_description_gives_way_to_the_view_and_the_caveat() -> None:
    for configured in ("Heatmaps of the suspicion model for the screening reading room",
                       "x" * 80, "AI regions - Research Use Only"):
        for view_key, outside in (("R-MLO", True), ("L-CC", False), (None, False)):
            text = series_description(configured, view_key, outside_domain=outside)
            assert len(text) <= 64, text
            assert text.lower().count("research use only") == 1, text
            assert text.startswith(f"{view_key} outside domain: ") == outside, text
            assert view_key is None or text.startswith(view_key), text
    assert series_description("Heatmaps of the suspicion model for the screening reading room",
                              "R-MLO", outside_domain=True) == (
        "R-MLO outside domain: Heatmaps of the - research use only")


@pytest.mark.parametrize("view_key", ["R-CC", "L-MLO"])
def test_fractional_round_trip_keeps_the_heatmap_and_passes_dciodvfy(
    sources: dict[str, Dataset], tmp_path: Path, view_key: str
) -> None:
    source = sources[view_key]
    heatmap = _heatmap(source)
    data = to_bytes(build_seg(source, heatmap, MODEL, SPEC))
    seg = dcmread(io.BytesIO(data))
    back = read_seg_heatmap(seg)
    assert back.shape == heatmap.shape and back.dtype == np.float32
    assert np.abs(back - heatmap).max() <= QUANTUM
    assert_dciodvfy_clean(data, tmp_path / f"seg-{view_key}.dcm", ALLOWED_WARNINGS)
    with pytest.raises(ValueError, match="not a binary SEG"):
        read_seg_regions(seg)


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
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert seg[keyword].value == source[keyword].value, keyword
    assert seg.SeriesNumber == 9902
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


def test_source_without_thickness_still_gives_clean_readable_segs(
    sources: dict[str, Dataset], tmp_path: Path
) -> None:
    source = Dataset()
    source.update(sources["R-CC"])
    del source.BodyPartThickness
    heatmap = _heatmap(source, seed=2)
    data = to_bytes(build_seg(source, heatmap, MODEL, SPEC))
    assert np.abs(read_seg_heatmap(dcmread(io.BytesIO(data))) - heatmap).max() <= QUANTUM
    assert_dciodvfy_clean(data, tmp_path / "seg-no-thickness.dcm", ALLOWED_WARNINGS)
    findings = find_findings(heatmap, MODEL.operating_point)
    data = to_bytes(build_binary_seg(source, findings, MODEL, REGIONS))
    assert read_seg_regions(dcmread(io.BytesIO(data))).sum() == sum(f.area_px for f in findings)
    assert_dciodvfy_clean(data, tmp_path / "seg-binary-no-thickness.dcm", ALLOWED_WARNINGS)


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
    # one series per source image (OHIF shows one SEG per series), the same on a rescore
    assert first.SeriesInstanceUID != other_view.SeriesInstanceUID
    regions = build_binary_seg(source, find_findings(heatmap, 0.5), MODEL, REGIONS)
    regions_again = build_binary_seg(source, (), MODEL, REGIONS)
    regions_other = build_binary_seg(sources["R-CC"], (), MODEL, REGIONS)
    assert regions.SOPInstanceUID == regions_again.SOPInstanceUID  # a rescore replaces it
    assert regions.SeriesInstanceUID == regions_again.SeriesInstanceUID
    assert regions.SeriesInstanceUID != regions_other.SeriesInstanceUID
    assert regions.SOPInstanceUID != regions_other.SOPInstanceUID
    # Binary and fractional SEGs of one image are two objects in two series.
    assert regions.SOPInstanceUID != first.SOPInstanceUID
    assert regions.SeriesInstanceUID != first.SeriesInstanceUID


def test_heatmap_must_match_the_source_grid(sources: dict[str, Dataset]) -> None:
    source = sources["R-CC"]
    heatmap = _heatmap(source)
    for wrong in (heatmap[:-1], heatmap.T, heatmap[None]):  # cropped, transposed, batched
        with pytest.raises(ValueError, match="Rows x Columns"):
            build_seg(source, wrong, MODEL, SPEC)
    with pytest.raises(ValueError, match="NaN"):
        build_seg(source, np.full_like(heatmap, np.nan), MODEL, SPEC)
    [finding] = find_findings(heatmap[:-1], 0.5)
    with pytest.raises(ValueError, match="Rows x Columns"):
        build_binary_seg(source, [finding], MODEL, REGIONS)


@pytest.mark.slow
def test_full_size_segs_are_clean_and_exact(tmp_path: Path) -> None:
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
    findings = find_findings(heatmap, MODEL.operating_point)
    data = to_bytes(build_binary_seg(source, findings, MODEL, REGIONS))
    assert len(data) < FULL_ROWS * FULL_COLS // 8 + 2**16  # 1 bit per pixel, plus the header
    assert np.array_equal(read_seg_regions(dcmread(io.BytesIO(data))), heatmap >= 0.5)
    assert_dciodvfy_clean(data, tmp_path / "seg-binary-full.dcm", ALLOWED_WARNINGS)

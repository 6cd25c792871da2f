"""The synthetic studies our tests and demo send are valid MG objects that look like mammograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    JPEG2000Lossless,
)

from tests.support.dciodvfy import run_dciodvfy
from tools.stack.make_study import TRANSFER_SYNTAXES, main, make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

# dciodvfy warnings we keep, each with its reason. Any other warning fails the tests.
ALLOWED_WARNINGS = {
    # View Position's defined terms (PS3.3 C.8.11.5) are the DX ones (AP, PA, LL, ...). Every
    # mammography unit sends the ACR MQCM abbreviation here, IHE Mammography Image asks for it,
    # and our view selection reads it; the coded view is in ViewCodeSequence as the standard wants.
    "Warning - Unrecognized defined term <CC> for value 1 of attribute <View Position>",
    "Warning - Unrecognized defined term <MLO> for value 1 of attribute <View Position>",
}

EXPECTED_ORIENTATION = {"R-CC": ["P", "L"], "L-CC": ["A", "R"], "R-MLO": ["P", "F"],
                        "L-MLO": ["A", "F"]}
VIEW_CODES = {"CC": "399162004", "MLO": "399368009"}


def _assert_clean(path: Path) -> None:
    errors, warnings = run_dciodvfy(path)
    assert errors == [], (path.name, errors)
    assert [w for w in warnings if w not in ALLOWED_WARNINGS] == [], path.name


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("sop_class", ["presentation", "processing"])
def test_generated_views_pass_dciodvfy(tmp_path: Path, syntax: str, sop_class: str) -> None:
    paths = make_study(tmp_path, rows=128, cols=104, transfer_syntax=syntax, seed=31,
                       sop_class=sop_class, lesions=["L-CC"])
    study_uids, series_uids = set(), set()
    for path in paths:
        _assert_clean(path)
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        study_uids.add(ds.StudyInstanceUID)
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.pixel_array.shape == (128, 104)
    assert len(study_uids) == 1 and len(series_uids) == 4  # one study, one series per view


def test_views_carry_the_mammography_attributes(tmp_path: Path) -> None:
    for path in make_study(tmp_path, rows=128, cols=104, seed=34):
        ds = dcmread(path)
        key = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        assert path.name == f"{key}.dcm"
        assert list(ds.PatientOrientation) == EXPECTED_ORIENTATION[key]
        assert ds.ViewCodeSequence[0].CodeValue == VIEW_CODES[str(ds.ViewPosition)]
        assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert "Laterality" not in ds  # the image carries it (ImageLaterality)
        assert (ds.Modality, ds.BitsStored, ds.BitsAllocated, ds.HighBit) == ("MG", 12, 16, 11)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.SOPClassUID == DigitalMammographyXRayImageStorageForPresentation
        assert (ds.BurnedInAnnotation, ds.BreastImplantPresent) == ("NO", "NO")
        assert float(ds.PixelSpacing[0]) < float(ds.ImagerPixelSpacing[0])  # magnification
        assert int(ds.pixel_array.max()) <= 4095


@pytest.mark.parametrize("view_key", ["R-CC", "L-CC", "R-MLO", "L-MLO"])
def test_chest_wall_is_on_the_side_the_orientation_says(tmp_path: Path, view_key: str) -> None:
    [path] = make_study(tmp_path, views=[view_key], rows=128, cols=104, seed=35)
    pixels = dcmread(path).pixel_array.astype(float)
    left, right = pixels[:, :10].mean(), pixels[:, -10:].mean()
    # Right breasts: chest wall (tissue) on the right of the image, air on the left.
    assert (right > 4 * left) if view_key.startswith("R") else (left > 4 * right)


def test_lesion_is_a_bright_blob_only_where_asked(tmp_path: Path) -> None:
    plain = dcmread(make_study(tmp_path / "a", views=["R-CC"], rows=256, cols=208, seed=36)[0])
    lesion = dcmread(make_study(tmp_path / "b", views=["R-CC"], rows=256, cols=208, seed=36,
                                lesions=["R-CC"])[0])
    assert int(lesion.pixel_array.max()) > int(plain.pixel_array.max()) + 500
    assert lesion.SOPInstanceUID != plain.SOPInstanceUID  # other pixels, other instance


def test_same_arguments_give_the_same_files_and_uids(tmp_path: Path) -> None:
    first = make_study(tmp_path / "a", views=["L-CC"], rows=64, cols=48, seed=37)
    again = make_study(tmp_path / "b", views=["L-CC"], rows=64, cols=48, seed=37)
    other = make_study(tmp_path / "c", views=["L-CC"], rows=64, cols=48, seed=38)
    assert first[0].read_bytes() == again[0].read_bytes()
    a, c = dcmread(first[0]), dcmread(other[0])
    assert a.StudyInstanceUID != c.StudyInstanceUID and a.SOPInstanceUID != c.SOPInstanceUID
    assert a.PatientID != c.PatientID


def test_lossless_syntaxes_carry_the_same_pixels_and_instance(tmp_path: Path) -> None:
    plain = dcmread(make_study(tmp_path / "a", views=["L-MLO"], rows=96, cols=80, seed=32)[0])
    for syntax in ("j2k", "rle", "jpegls"):
        coded = dcmread(make_study(tmp_path / syntax, views=["L-MLO"], rows=96, cols=80, seed=32,
                                   transfer_syntax=syntax)[0])
        assert np.array_equal(plain.pixel_array, coded.pixel_array), syntax
        assert coded.SOPInstanceUID == plain.SOPInstanceUID


def test_lossy_is_a_new_instance_that_says_so(tmp_path: Path) -> None:
    plain = dcmread(make_study(tmp_path / "a", views=["R-CC"], rows=96, cols=80, seed=39)[0])
    lossy = dcmread(make_study(tmp_path / "b", views=["R-CC"], rows=96, cols=80, seed=39,
                               transfer_syntax="j2k-lossy")[0])
    assert lossy.file_meta.TransferSyntaxUID == JPEG2000
    assert lossy.LossyImageCompression == "01"
    assert lossy.LossyImageCompressionMethod == "ISO_15444_1"
    assert lossy.ImageType[0] == "DERIVED"
    assert lossy.SOPInstanceUID != plain.SOPInstanceUID
    difference = np.abs(lossy.pixel_array.astype(int) - plain.pixel_array.astype(int))
    assert 0 < difference.mean() < 50


def test_for_processing_class(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, views=["R-MLO"], rows=64, cols=48, seed=40,
                        sop_class="processing")
    ds = dcmread(path)
    assert ds.SOPClassUID == DigitalMammographyXRayImageStorageForProcessing
    assert ds.PresentationIntentType == "FOR PROCESSING"
    assert "WindowCenter" not in ds


def test_corrupt_view_has_a_valid_header_and_undecodable_pixels(tmp_path: Path) -> None:
    paths = make_study(tmp_path, views=["R-CC", "L-CC"], rows=96, cols=80, seed=33,
                       corrupt=["R-CC"])
    broken, fine = dcmread(paths[0]), dcmread(paths[1])
    _assert_clean(paths[0])
    assert broken.SOPClassUID == DigitalMammographyXRayImageStorageForPresentation
    assert broken.file_meta.TransferSyntaxUID == JPEG2000Lossless
    with pytest.raises(Exception):  # noqa: B017 - any decoder error is what we want here
        _ = broken.pixel_array
    assert fine.pixel_array.shape == (96, 80)


def test_cli_prints_the_paths_and_rejects_unknown_views(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(tmp_path), "--views", "R-CC,L-MLO", "--rows", "64", "--cols", "48",
                 "--transfer-syntax", "rle", "--seed", "5", "--lesion", "L-MLO",
                 "--patient-id", "PID-5", "--accession", "ACC-5"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "R-CC.dcm"), str(tmp_path / "L-MLO.dcm")]
    ds = dcmread(printed[1])
    assert (ds.PatientID, ds.AccessionNumber) == ("PID-5", "ACC-5")
    assert main([str(tmp_path), "--views", "R-XX"]) == 2
    assert "unknown view" in capsys.readouterr().err

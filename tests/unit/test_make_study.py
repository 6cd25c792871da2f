"""The synthetic studies our tests and demo send are valid MG objects (dciodvfy: no errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.dciodvfy import run_dciodvfy
from tools.make_study import make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

EXPECTED_ORIENTATION = {"R-CC": ["P", "L"], "L-CC": ["A", "R"], "R-MLO": ["P", "F"],
                        "L-MLO": ["A", "F"]}


@pytest.mark.parametrize("syntax", ["explicit", "j2k", "rle", "jpegls"])
def test_generated_views_pass_dciodvfy(tmp_path: Path, syntax: str) -> None:
    paths = make_study(tmp_path, rows=128, cols=104, transfer_syntax=syntax, seed=31)
    study_uids = set()
    for path in paths:
        errors, _ = run_dciodvfy(path)
        assert errors == [], (path.name, errors)
        ds = dcmread(path)
        study_uids.add(ds.StudyInstanceUID)
        key = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        assert list(ds.PatientOrientation) == EXPECTED_ORIENTATION[key]
        assert ds.pixel_array.shape == (128, 104)
    assert len(study_uids) == 1


def test_lossless_syntaxes_carry_the_same_pixels(tmp_path: Path) -> None:
    plain = dcmread(make_study(tmp_path / "a", views=["L-MLO"], rows=96, cols=80, seed=32)[0])
    j2k = dcmread(make_study(tmp_path / "b", views=["L-MLO"], rows=96, cols=80, seed=32,
                             transfer_syntax="j2k")[0])
    assert np.array_equal(plain.pixel_array, j2k.pixel_array)


def test_corrupt_view_has_a_valid_header_and_undecodable_pixels(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=96, cols=80, seed=33, corrupt=["R-CC"])
    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
    with pytest.raises(Exception):  # noqa: B017 - any decoder error is what we want here
        _ = ds.pixel_array

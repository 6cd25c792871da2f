"""SR and SEG writers: valid when built, round-tripped through bytes, judged by dciodvfy."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from pipelines.results import ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.seg import build_seg, read_seg_heatmap
from pipelines.sr import SCHEME, build_sr, read_sr_scores
from tests.dciodvfy import run_dciodvfy
from tools.make_study import make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

MODEL = ModelIdentity("mias-baseline", "0.1.0", operating_point=0.25)
SR_SPEC = OutputSpec(9901, "AI mammography report")
SEG_SPEC = OutputSpec(9902, "AI suspicion heatmap")

# dciodvfy warnings we keep, each with its reason. Any other warning fails the tests.
ALLOWED_WARNINGS = {
    # Our concepts without a standard code use a private coding scheme, as PS3.16 8.2 allows
    # ("99" prefix); dciodvfy only knows the registered schemes.
    f"Unrecognized defined term <{SCHEME}> for value 1 of attribute <Coding Scheme Designator>",
}


def _round_trip(dataset: Dataset) -> Dataset:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def _judge(dataset: Dataset, path: Path) -> None:
    dataset.save_as(path, enforce_file_format=True)
    errors, warnings = run_dciodvfy(path)
    assert errors == []
    unexpected = [w for w in warnings if not any(a in w for a in ALLOWED_WARNINGS)]
    assert unexpected == []


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    paths = make_study(tmp_path_factory.mktemp("study"), rows=128, cols=104, seed=21)
    headers = [dcmread(p) for p in paths]
    for header in headers:
        del header.PixelData
    return headers


def _result(sources: list[Dataset], probabilities: list[float], missing=()) -> StudyResult:
    views = tuple(
        ViewScore(str(s.SOPInstanceUID), str(s.SOPClassUID), str(s.SeriesInstanceUID),
                  str(s.ImageLaterality), str(s.ViewPosition), p)
        for s, p in zip(sources, probabilities, strict=True)
    )
    breasts: dict[str, float] = {}
    for view in views:
        breasts[view.laterality] = max(breasts.get(view.laterality, 0.0), view.probability)
    return StudyResult(str(sources[0].StudyInstanceUID), views, breasts, max(breasts.values()),
                       tuple(missing))


def test_sr_round_trips_with_every_score_and_passes_dciodvfy(sources: list[Dataset],
                                                             tmp_path: Path) -> None:
    result = _result(sources, [0.1, 0.62, 0.2, 0.05])
    sr = _round_trip(build_sr(sources, result, MODEL, SR_SPEC))
    scores = read_sr_scores(sr)
    assert scores["views"] == {"R-CC": 0.1, "L-CC": 0.62, "R-MLO": 0.2, "L-MLO": 0.05}
    assert scores["breasts"] == {"R": 0.2, "L": 0.62}
    assert scores["exam"] == 0.62
    assert scores["qualitative"]["exam"] == "Suspicious"
    assert scores["qualitative"]["breast R"] == "Not suspicious"
    assert scores["model"] == {"name": "mias-baseline", "version": "0.1.0"}
    assert scores["missing_views"] == []
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    assert sr.SeriesNumber == 9901 and sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    path = tmp_path / "sr.dcm"
    _judge(sr, path)
    report = hd.sr.srread(path)
    groups = report.content.get_image_measurement_groups()
    assert len(groups) == 4 + 2 + 1  # views, breasts, exam
    by_tracking = {g.tracking_identifier: [m.value for m in g.get_measurements()] for g in groups}
    assert by_tracking["view L-CC"] == [0.62] and by_tracking["exam"] == [0.62]


def test_sr_names_missing_views(sources: list[Dataset], tmp_path: Path) -> None:
    result = _result(sources[:2], [0.3, 0.1], missing=("R-MLO", "L-MLO"))
    sr = _round_trip(build_sr(sources[:2], result, MODEL, SR_SPEC))
    assert read_sr_scores(sr)["missing_views"] == ["R-MLO", "L-MLO"]
    _judge(sr, tmp_path / "sr-partial.dcm")


def test_sr_uids_are_deterministic(sources: list[Dataset]) -> None:
    result = _result(sources, [0.1, 0.2, 0.3, 0.4])
    first = build_sr(sources, result, MODEL, SR_SPEC)
    again = build_sr(sources, result, MODEL, SR_SPEC)
    other = build_sr(sources, result, ModelIdentity("mias-baseline", "0.2.0", 0.25), SR_SPEC)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                               again.SeriesInstanceUID)
    assert first.SOPInstanceUID != other.SOPInstanceUID


def test_seg_carries_the_heatmap_on_the_source_grid(sources: list[Dataset], tmp_path: Path
                                                    ) -> None:
    source = sources[1]
    rng = np.random.default_rng(0)
    heatmap = rng.random((int(source.Rows), int(source.Columns))).astype(np.float32)
    seg = _round_trip(build_seg(source, heatmap, MODEL, SEG_SPEC))
    back = read_seg_heatmap(seg)
    assert back.shape == heatmap.shape
    assert np.abs(back - heatmap).max() <= 0.5 / 255 + 1e-6  # fractional quantisation
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientOrientation == source.PatientOrientation
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    path = tmp_path / "seg.dcm"
    _judge(seg, path)
    reread = hd.seg.segread(path)
    assert reread.number_of_segments == 1


def test_seg_uids_deterministic_and_grid_checked(sources: list[Dataset]) -> None:
    source = sources[0]
    heatmap = np.zeros((int(source.Rows), int(source.Columns)), np.float32)
    first = build_seg(source, heatmap, MODEL, SEG_SPEC)
    again = build_seg(source, heatmap, MODEL, SEG_SPEC)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    with pytest.raises(ValueError, match="Rows x Columns"):
        build_seg(source, heatmap[:-1], MODEL, SEG_SPEC)
    with pytest.raises(ValueError, match="NaN"):
        build_seg(source, np.full_like(heatmap, np.nan), MODEL, SEG_SPEC)

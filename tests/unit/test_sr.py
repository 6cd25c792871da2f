"""The TID 1500 report: what a viewer and a PACS will read, re-read through bytes and highdicom."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom import Dataset, dcmread

from pipelines.results import ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.seg import build_seg
from pipelines.sr import (
    ABNORMALITY_SCORE,
    BOTH_BREASTS,
    NOT_SUSPICIOUS,
    PROBABILITY_UNIT,
    SCHEME,
    SUSPICION_AT_OPERATING_POINT,
    SUSPICIOUS,
    build_sr,
    read_sr_scores,
)
from tests.support.dciodvfy import assert_dciodvfy_clean, to_bytes
from tools.stack.make_study import make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

MODEL = ModelIdentity("mias-baseline", "0.1.0", operating_point=0.5)
SPEC = OutputSpec(9901, "AI mammography report", uid_root="1.2.826.0.1.3680043.10.999.")
PROBABILITIES = {"R-CC": 0.1, "L-CC": 0.62, "R-MLO": 0.2, "L-MLO": 0.05}

# dciodvfy warnings we keep, each with its reason. Any other warning fails the tests.
ALLOWED_WARNINGS = {
    # Concepts without a standard code use our private scheme (PS3.16 8.2, "99" prefix), which
    # the SR declares in its Coding Scheme Identification Sequence; dciodvfy only knows the
    # registered schemes and warns once per use.
    f"Warning - Unrecognized defined term <{SCHEME}> for value 1 of attribute "
    "<Coding Scheme Designator>",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    paths = make_study(tmp_path_factory.mktemp("study"), rows=256, cols=208, seed=21)
    return [dcmread(p, stop_before_pixels=True) for p in paths]


def _result(sources: list[Dataset], missing: tuple[str, ...] = ()) -> StudyResult:
    views = tuple(
        ViewScore(str(s.SOPInstanceUID), str(s.SOPClassUID), str(s.SeriesInstanceUID),
                  str(s.ImageLaterality), str(s.ViewPosition),
                  PROBABILITIES[f"{s.ImageLaterality}-{s.ViewPosition}"])
        for s in sources
    )
    breasts: dict[str, float] = {}
    for view in views:
        breasts[view.laterality] = max(breasts.get(view.laterality, 0.0), view.probability)
    return StudyResult(str(sources[0].StudyInstanceUID), views, breasts, max(breasts.values()),
                       missing)


def _group_texts(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, str]:
    """{concept code value: text} of the TEXT items anywhere in a group (algorithm id lives there)."""
    items = find_content_items(group[0], value_type=ValueTypeValues.TEXT, recursive=True)
    return {item.name.value: item.value for item in items}


def test_round_trip_keeps_every_score(sources: list[Dataset], tmp_path: Path) -> None:
    result = _result(sources)
    data = to_bytes(build_sr(sources, result, MODEL, SPEC))
    scores = read_sr_scores(dcmread(io.BytesIO(data)))
    assert scores["views"] == PROBABILITIES
    assert scores["views_by_sop_uid"] == {v.sop_uid: v.probability for v in result.views}
    assert scores["breasts"] == {"R": 0.2, "L": 0.62}
    assert scores["exam"] == 0.62
    assert scores["qualitative"] == {
        "view R-CC": "Not suspicious", "view L-CC": "Suspicious", "view R-MLO": "Not suspicious",
        "view L-MLO": "Not suspicious", "breast R": "Not suspicious", "breast L": "Suspicious",
        "exam": "Suspicious",
    }
    assert scores["model"] == {"name": "mias-baseline", "version": "0.1.0"}
    assert scores["missing_views"] == [] and scores["seg_sop_uids"] == []
    assert_dciodvfy_clean(data, tmp_path / "sr.dcm", ALLOWED_WARNINGS)


def test_highdicom_reads_every_group_with_its_codes(sources: list[Dataset]) -> None:
    result = _result(sources)
    data = to_bytes(build_sr(sources, result, MODEL, SPEC))
    sr = hd.sr.srread(io.BytesIO(data))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    again = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(data)))
    groups = sr.content.get_image_measurement_groups()
    assert len(again.content.get_image_measurement_groups()) == len(groups) == 4 + 2 + 1
    by_view = {f"view {v.view_key}": v for v in result.views}
    for group in groups:
        [measurement] = group.get_measurements()
        assert measurement.name == ABNORMALITY_SCORE and measurement.unit == PROBABILITY_UNIT
        [evaluation] = group.get_qualitative_evaluations(name=SUSPICION_AT_OPERATING_POINT)
        expected = SUSPICIOUS if measurement.value >= MODEL.operating_point else NOT_SUSPICIOUS
        assert evaluation.value == expected
        texts = _group_texts(group)  # 111001 Algorithm Name, 111003 Algorithm Version
        assert (texts["111001"], texts["111003"]) == (MODEL.name, MODEL.version)
        [site] = group.finding_sites
        assert site.value.meaning == "Breast"
        referenced = {image.referenced_sop_instance_uid for image in measurement.referenced_images}
        tracking = group.tracking_identifier
        if tracking in by_view:
            view = by_view[tracking]
            assert measurement.value == pytest.approx(view.probability)
            assert referenced == {view.sop_uid}
            assert site.laterality.value == {"R": "24028007", "L": "7771000"}[view.laterality]
        elif tracking == "exam":
            assert site.laterality == BOTH_BREASTS
            assert referenced == {v.sop_uid for v in result.views}
        else:
            laterality = tracking.removeprefix("breast ")
            assert referenced == {v.sop_uid for v in result.views if v.laterality == laterality}


def test_joins_the_source_study_as_an_unverified_device_report(sources: list[Dataset]) -> None:
    sr = dcmread(io.BytesIO(to_bytes(build_sr(sources, _result(sources), MODEL, SPEC))))
    source = sources[0]
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.SeriesNumber, sr.SeriesDescription) == (9901, "AI mammography report")
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    observer_types = [context.observer_type.meaning for context in report.get_observer_contexts()]
    assert observer_types == ["Device"]
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [
        SCHEME]
    assert sr.SOPInstanceUID.startswith(SPEC.uid_root or "")


def test_missing_views_are_named(sources: list[Dataset], tmp_path: Path) -> None:
    result = _result(sources[:2], missing=("R-MLO", "L-MLO"))
    data = to_bytes(build_sr(sources[:2], result, MODEL, SPEC))
    scores = read_sr_scores(dcmread(io.BytesIO(data)))
    assert scores["missing_views"] == ["R-MLO", "L-MLO"]
    assert scores["views"] == {"R-CC": 0.1, "L-CC": 0.62}
    assert_dciodvfy_clean(data, tmp_path / "sr-partial.dcm", ALLOWED_WARNINGS)


def test_heatmap_segs_are_listed_as_evidence(sources: list[Dataset], tmp_path: Path) -> None:
    heatmap = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), np.float32)
    seg = build_seg(sources[0], heatmap, MODEL, OutputSpec(9902, "AI heatmap"))
    result = _result(sources)
    with_seg = build_sr(sources, result, MODEL, SPEC, seg_refs=[seg])
    data = to_bytes(with_seg)
    assert read_sr_scores(dcmread(io.BytesIO(data)))["seg_sop_uids"] == [seg.SOPInstanceUID]
    assert with_seg.SOPInstanceUID == build_sr(sources, result, MODEL, SPEC).SOPInstanceUID
    assert_dciodvfy_clean(data, tmp_path / "sr-with-seg.dcm", ALLOWED_WARNINGS)


def test_uids_depend_on_inputs_model_and_operating_point(sources: list[Dataset]) -> None:
    result = _result(sources)
    first = build_sr(sources, result, MODEL, SPEC)
    again = build_sr(sources, result, MODEL, SPEC)
    newer = build_sr(sources, result, ModelIdentity("mias-baseline", "0.2.0", 0.5), SPEC)
    fewer = build_sr(sources[:2], _result(sources[:2]), MODEL, SPEC)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                               again.SeriesInstanceUID)
    stricter = build_sr(sources, result, ModelIdentity(MODEL.name, MODEL.version,
                                                       MODEL.operating_point + 0.1), SPEC)
    assert first.SOPInstanceUID not in {newer.SOPInstanceUID, fewer.SOPInstanceUID,
                                        stricter.SOPInstanceUID}
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID


def test_refuses_scores_that_do_not_match_the_sources(sources: list[Dataset]) -> None:
    result = _result(sources)
    with pytest.raises(ValueError, match="not among the sources"):
        build_sr(sources[:3], result, MODEL, SPEC)
    stranger = Dataset()
    stranger.update(sources[0])
    stranger.StudyInstanceUID = "1.2.3.4"
    stranger.SOPInstanceUID = "1.2.3.4.5"
    with pytest.raises(ValueError, match="not in study"):
        build_sr([*sources, stranger], result, MODEL, SPEC)

"""The TID 1500 report: what a viewer and a PACS will read, re-read through bytes and highdicom,
judged by dciodvfy and pixelmed."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom import Dataset, dcmread

from node.version import software_version
from pipelines.attribution import RESEARCH_USE_LABEL
from pipelines.findings import find_findings
from pipelines.results import ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.seg import build_seg
from pipelines.sr import (
    ABNORMALITY_SCORE,
    BOTH_BREASTS,
    NOT_SUSPICIOUS,
    PROBABILITY_UNIT,
    REGION_SCORE,
    SCHEME,
    SUSPICION_AT_OPERATING_POINT,
    SUSPICIOUS,
    build_sr,
    read_sr_scores,
)
from tests.support.dciodvfy import assert_dciodvfy_clean, to_bytes
from tests.support.pixelmed import assert_pixelmed_clean
from tools.stack.make_study import make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

MODEL = ModelIdentity("mias-baseline", "0.1.0", operating_point=0.5)
SPEC = OutputSpec(9901, "AI mammography report", uid_root="1.2.826.0.1.3680043.10.999.")
PROBABILITIES = {"R-CC": 0.1, "L-CC": 0.62, "R-MLO": 0.2, "L-MLO": 0.05}
# Heatmap blobs per view: (row, column, peak, radius); L-CC has two regions above the operating
# point, R-MLO a bump below it (no finding), the others are flat but for one faint bump each.
BLOBS = {"L-CC": [(150, 120, 0.9, 12), (60, 50, 0.7, 8)], "R-MLO": [(100, 60, 0.3, 10)],
         "R-CC": [(40, 40, 0.2, 6)], "L-MLO": [(200, 150, 0.1, 6)]}

# dciodvfy warnings we keep, each with its reason. Any other warning fails the tests.
ALLOWED_WARNINGS = {
    # Concepts without a standard code use our private scheme (PS3.16 8.2, "99" prefix), which
    # the SR declares in its Coding Scheme Identification Sequence; dciodvfy only knows the
    # registered schemes and warns once per use.
    f"Warning - Unrecognized defined term <{SCHEME}> for value 1 of attribute "
    "<Coding Scheme Designator>",
}
# pixelmed warnings we keep (substring: reason). Any other warning, and any error, fails.
PIXELMED_ALLOWED_WARNINGS = {
    'CODE (MN002,99MAMMONODE,"Suspicion at operating point"): Content Item not in template':
        "the verdict at the operating point is a qualitative evaluation of its measurement "
        "group (highdicom's TID 1410 qualitative evaluations); pixelmed's template tables have "
        "no row for qualitative evaluations inside a planar ROI group",
    'CODE (111031,DCM,"Image View"): Content Item not in template':
        "the view (CC, MLO) of a view group, a qualitative evaluation of that group, for the "
        "same reason",
    'CODE (MN005,99MAMMONODE,"Screening view not available"): Content Item not in template':
        "the missing screening views, qualitative evaluations of the exam group, for the same "
        "reason",
}


def _heatmap(rows: int, cols: int, blobs: list[tuple[int, int, float, int]]
             ) -> npt.NDArray[np.float32]:
    yy, xx = np.mgrid[:rows, :cols]
    heatmap = np.zeros((rows, cols), np.float32)
    for row, col, peak, radius in blobs:
        heatmap = np.maximum(heatmap, peak * np.exp(-((yy - row) ** 2 + (xx - col) ** 2)
                                                    / (2.0 * radius ** 2)))
    return heatmap.astype(np.float32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    paths = make_study(tmp_path_factory.mktemp("study"), rows=256, cols=208, seed=21)
    return [dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def heatmaps(sources: list[Dataset]) -> dict[str, npt.NDArray[np.float32]]:
    return {str(s.SOPInstanceUID): _heatmap(int(s.Rows), int(s.Columns),
                                             BLOBS[f"{s.ImageLaterality}-{s.ViewPosition}"])
            for s in sources}


@pytest.fixture(scope="module")
def report(sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]]) -> bytes:
    return to_bytes(build_sr(sources, _result(sources), MODEL, SPEC, heatmaps=heatmaps))


def _key(source: Dataset) -> str:
    return f"{source.ImageLaterality}-{source.ViewPosition}"


def _result(sources: list[Dataset], missing: tuple[str, ...] = ()) -> StudyResult:
    views = tuple(
        ViewScore(str(s.SOPInstanceUID), str(s.SOPClassUID), str(s.SeriesInstanceUID),
                  str(s.ImageLaterality), str(s.ViewPosition), PROBABILITIES[_key(s)])
        for s in sources
    )
    breasts: dict[str, float] = {}
    for view in views:
        breasts[view.laterality] = max(breasts.get(view.laterality, 0.0), view.probability)
    return StudyResult(str(sources[0].StudyInstanceUID), views, breasts, max(breasts.values()),
                       missing)


def _group_texts(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> dict[str, str]:
    """{concept code value: text} of the TEXT items anywhere in a group (algorithm id lives there)."""
    items = find_content_items(group[0], value_type=ValueTypeValues.TEXT, recursive=True)
    return {item.name.value: item.value for item in items}


def _measurement_groups(ds: Dataset) -> list[Dataset]:
    """The Measurement Group containers, straight from the data set (as a viewer walks it)."""
    [measurements] = [item for item in ds.ContentSequence
                      if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [item for item in measurements.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "125007"]


def _peak(heatmap: npt.NDArray[np.float32]) -> tuple[float, float]:
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float(col) + 0.5, float(row) + 0.5


def test_round_trip_keeps_every_score_and_finding(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]], report: bytes,
        tmp_path: Path) -> None:
    result = _result(sources)
    scores = read_sr_scores(dcmread(io.BytesIO(report)))
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
    # The findings are exactly pipelines/findings.py's, on their own images, strongest first.
    expected = [(view.view_key, view.sop_uid, finding)
                for view in result.views
                for finding in find_findings(heatmaps[view.sop_uid], MODEL.operating_point)]
    assert [f["view"] for f in scores["findings"]] == ["L-CC", "L-CC"]
    assert len(scores["findings"]) == len(expected)
    for mark, (view_key, sop_uid, finding) in zip(scores["findings"], expected, strict=True):
        assert (mark["view"], mark["sop_uid"], mark["graphic_type"]) == (view_key, sop_uid,
                                                                          "ELLIPSE")
        assert mark["score"] == pytest.approx(finding.score, abs=1e-6)
        assert mark["points"] == list(finding.ellipse())  # half pixels: exact in FL
    assert [round(f["score"] or 0, 1) for f in scores["findings"]] == [0.9, 0.7]
    assert scores["texts"][0] == RESEARCH_USE_LABEL
    assert any(text.startswith("Exam abnormality score 0.620: suspicious")
               for text in scores["texts"])
    assert any(text.startswith("Left breast abnormality score 0.620: suspicious")
               for text in scores["texts"])
    assert any(text.startswith("Right breast abnormality score 0.200: not suspicious")
               for text in scores["texts"])
    assert_dciodvfy_clean(report, tmp_path / "sr.dcm", ALLOWED_WARNINGS)


@pytest.mark.slow
@pytest.mark.requires_bin("java")
def test_pixelmed_finds_no_error(report: bytes) -> None:
    assert_pixelmed_clean(dcmread(io.BytesIO(report)), PIXELMED_ALLOWED_WARNINGS)


def test_every_group_has_a_region_on_a_source_image(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]],
        report: bytes) -> None:
    """OHIF 3.13 loads a measurement group only through its SCOORD's ReferencedSOPSequence and
    throws on a group without one; every group here has an Image Region on a source image."""
    by_key = {_key(s): s for s in sources}
    groups = _measurement_groups(dcmread(io.BytesIO(report)))
    assert len(groups) == 4 + 2 + 1 + 2
    anchors = {}
    for group in groups:
        tracking = next(str(item.TextValue) for item in group.ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeValue == "112039")
        [region] = [item for item in group.ContentSequence if item.ValueType == "SCOORD"]
        [image] = region.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        [reference] = image.ReferencedSOPSequence
        assert reference.ReferencedSOPInstanceUID in {str(s.SOPInstanceUID) for s in sources}
        anchors[tracking] = (str(region.GraphicType), reference.ReferencedSOPInstanceUID,
                             [float(v) for v in region.GraphicData])
    # Listed exam first, then breasts, views and findings (OHIF lists them in this order).
    assert list(anchors)[:3] == ["exam", "breast R", "breast L"]
    assert list(anchors)[-2:] == ["finding L-CC 1", "finding L-CC 2"]
    # View, breast and exam scores sit at the heatmap peak of the image that gave them.
    deciding = {"view R-CC": "R-CC", "view L-CC": "L-CC", "view R-MLO": "R-MLO",
                "view L-MLO": "L-MLO", "breast R": "R-MLO", "breast L": "L-CC", "exam": "L-CC"}
    for tracking, key in deciding.items():
        sop_uid = str(by_key[key].SOPInstanceUID)
        assert anchors[tracking] == ("POINT", sop_uid, list(_peak(heatmaps[sop_uid]))), tracking
    assert {t: a[0] for t, a in anchors.items() if t.startswith("finding")} == {
        "finding L-CC 1": "ELLIPSE", "finding L-CC 2": "ELLIPSE"}


def test_highdicom_reads_every_group_with_its_codes(
        sources: list[Dataset], report: bytes) -> None:
    result = _result(sources)
    sr = hd.sr.srread(io.BytesIO(report))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert sr.content.get_image_measurement_groups() == []
    by_view = {f"view {v.view_key}": v for v in result.views}
    for group in groups:
        texts = _group_texts(group)  # 111001 Algorithm Name, 111003 Algorithm Version
        assert (texts["111001"], texts["111003"]) == (MODEL.name, MODEL.version)
        [site] = group.finding_sites
        assert site.value.meaning == "Breast"
        tracking = group.tracking_identifier
        if tracking.startswith("finding"):
            [measurement] = group.get_measurements()
            assert measurement.name == REGION_SCORE and measurement.unit == PROBABILITY_UNIT
            assert measurement.value >= MODEL.operating_point
            continue
        [measurement] = group.get_measurements()
        assert measurement.name == ABNORMALITY_SCORE and measurement.unit == PROBABILITY_UNIT
        [evaluation] = group.get_qualitative_evaluations(name=SUSPICION_AT_OPERATING_POINT)
        expected = SUSPICIOUS if measurement.value >= MODEL.operating_point else NOT_SUSPICIOUS
        assert evaluation.value == expected
        referenced = {image.referenced_sop_instance_uid for image in measurement.referenced_images}
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


def test_joins_the_source_study_labelled_and_attributed(
        sources: list[Dataset], report: bytes) -> None:
    sr = dcmread(io.BytesIO(report))
    source = sources[0]
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == 9901
    assert sr.SeriesDescription == "AI mammography report - research use only"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    [procedure] = find_content_items(sr, name=hd.sr.CodedConcept("121058", "DCM",
                                                                 "Procedure reported"))
    assert (procedure.ConceptCodeSequence[0].CodeValue,
            procedure.ConceptCodeSequence[0].CodingSchemeDesignator) == ("363679005", "SCT")
    [performed] = sr.PerformedProcedureCodeSequence
    assert (performed.CodeValue, performed.CodingSchemeDesignator) == ("24606-6", "LN")
    [equipment] = sr.ContributingEquipmentSequence
    assert equipment.ManufacturerModelName == MODEL.name
    assert list(equipment.SoftwareVersions) == [software_version(), f"model {MODEL.version}"]
    assert RESEARCH_USE_LABEL in equipment.ContributionDescription
    assert sr.SoftwareVersions == software_version()
    report_content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report_content, hd.sr.MeasurementReport)
    observer_types = [context.observer_type.meaning
                      for context in report_content.get_observer_contexts()]
    assert observer_types == ["Device"]
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [
        SCHEME]
    assert sr.SOPInstanceUID.startswith(SPEC.uid_root or "")


def test_missing_views_are_named(sources: list[Dataset],
                                 heatmaps: dict[str, npt.NDArray[np.float32]],
                                 tmp_path: Path) -> None:
    result = _result(sources[:2], missing=("R-MLO", "L-MLO"))
    data = to_bytes(build_sr(sources[:2], result, MODEL, SPEC, heatmaps=heatmaps))
    scores = read_sr_scores(dcmread(io.BytesIO(data)))
    assert scores["missing_views"] == ["R-MLO", "L-MLO"]
    assert scores["views"] == {"R-CC": 0.1, "L-CC": 0.62}
    assert "Screening views not available: R-MLO, L-MLO" in scores["texts"]
    assert_dciodvfy_clean(data, tmp_path / "sr-partial.dcm", ALLOWED_WARNINGS)


def test_heatmap_segs_are_listed_as_evidence(sources: list[Dataset],
                                             heatmaps: dict[str, npt.NDArray[np.float32]],
                                             tmp_path: Path) -> None:
    heatmap = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), np.float32)
    seg = build_seg(sources[0], heatmap, MODEL, OutputSpec(9902, "AI heatmap"))
    result = _result(sources)
    with_seg = build_sr(sources, result, MODEL, SPEC, heatmaps=heatmaps, seg_refs=[seg])
    data = to_bytes(with_seg)
    assert read_sr_scores(dcmread(io.BytesIO(data)))["seg_sop_uids"] == [seg.SOPInstanceUID]
    plain = build_sr(sources, result, MODEL, SPEC, heatmaps=heatmaps)
    assert with_seg.SOPInstanceUID == plain.SOPInstanceUID
    assert_dciodvfy_clean(data, tmp_path / "sr-with-seg.dcm", ALLOWED_WARNINGS)


def test_given_findings_are_the_ones_reported(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]],
        report: bytes) -> None:
    """The worker finds the findings once for every object; the SR reports what it is given."""
    findings = {uid: find_findings(heatmap, MODEL.operating_point)
                for uid, heatmap in heatmaps.items()}
    given = build_sr(sources, _result(sources), MODEL, SPEC, heatmaps=heatmaps,
                     findings=findings)
    computed = dcmread(io.BytesIO(report))
    assert given.SOPInstanceUID == computed.SOPInstanceUID
    assert given.ContentSequence == computed.ContentSequence
    only_first = {uid: marks[:1] for uid, marks in findings.items()}
    fewer = build_sr(sources, _result(sources), MODEL, SPEC, heatmaps=heatmaps,
                     findings=only_first)
    assert [f["view"] for f in read_sr_scores(fewer)["findings"]] == ["L-CC"]


def test_uids_depend_on_inputs_model_and_operating_point(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]]) -> None:
    result = _result(sources)
    first = build_sr(sources, result, MODEL, SPEC, heatmaps=heatmaps)
    again = build_sr(sources, result, MODEL, SPEC, heatmaps=heatmaps)
    newer = build_sr(sources, result, ModelIdentity("mias-baseline", "0.2.0", 0.5), SPEC,
                     heatmaps=heatmaps)
    fewer = build_sr(sources[:2], _result(sources[:2]), MODEL, SPEC, heatmaps=heatmaps)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                               again.SeriesInstanceUID)
    stricter = build_sr(sources, result, ModelIdentity(MODEL.name, MODEL.version,
                                                       MODEL.operating_point + 0.1), SPEC,
                        heatmaps=heatmaps)
    assert first.SOPInstanceUID not in {newer.SOPInstanceUID, fewer.SOPInstanceUID,
                                        stricter.SOPInstanceUID}
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID


def test_refuses_scores_that_do_not_match_the_sources(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]]) -> None:
    result = _result(sources)
    with pytest.raises(ValueError, match="not among the sources"):
        build_sr(sources[:3], result, MODEL, SPEC, heatmaps=heatmaps)
    stranger = copy.deepcopy(sources[0])  # update() would share, and so change, its elements
    stranger.StudyInstanceUID = "1.2.3.4"
    stranger.SOPInstanceUID = "1.2.3.4.5"
    with pytest.raises(ValueError, match="not in study"):
        build_sr([*sources, stranger], result, MODEL, SPEC, heatmaps=heatmaps)
    first = str(sources[0].SOPInstanceUID)
    with pytest.raises(ValueError, match="heatmaps: none"):
        build_sr(sources, result, MODEL, SPEC,
                 heatmaps={uid: h for uid, h in heatmaps.items() if uid != first})
    with pytest.raises(ValueError, match="its image is"):
        build_sr(sources, result, MODEL, SPEC,
                 heatmaps={**heatmaps, first: np.zeros((8, 8), np.float32)})


def test_views_outside_the_domain_are_named_in_the_text(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]],
        tmp_path: Path) -> None:
    result = _result(sources)
    flagged = result.views[1]
    data = to_bytes(build_sr(sources, result, MODEL, SPEC, heatmaps=heatmaps,
                             outside_domain={flagged.sop_uid: ["pixel_spacing", "view"]}))
    texts = read_sr_scores(dcmread(io.BytesIO(data)))["texts"]
    said = [t for t in texts if "outside the model's declared domain" in t]
    assert said == [f"{flagged.view_key}: outside the model's declared domain (pixel size, view); "
                    "its score was not validated on such images"]
    plain = build_sr(sources, result, MODEL, SPEC, heatmaps=heatmaps)
    assert not any("declared domain" in t for t in read_sr_scores(plain)["texts"])
    assert_dciodvfy_clean(data, tmp_path / "sr-outside-domain.dcm", ALLOWED_WARNINGS)
    assert_pixelmed_clean(dcmread(io.BytesIO(data)), PIXELMED_ALLOWED_WARNINGS)


def test_views_left_unscored_outside_the_domain_are_said_not_missing(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]],
        tmp_path: Path) -> None:
    """`scoring.outside_domain: skip`: the CC views were received but not scored; the report
    scores the MLO views, says why the CC views have no score, and lists no view as missing."""
    from dataclasses import replace

    mlo = [s for s in sources if s.ViewPosition == "MLO"]
    result = replace(_result(mlo), not_scored=(("R-CC", ("view",)), ("L-CC", ("pixel_spacing",
                                                                               "view"))))
    data = to_bytes(build_sr(mlo, result, MODEL, SPEC, heatmaps={
        str(s.SOPInstanceUID): heatmaps[str(s.SOPInstanceUID)] for s in mlo}))
    read = read_sr_scores(dcmread(io.BytesIO(data)))
    assert sorted(read["views"]) == ["L-MLO", "R-MLO"] and read["missing_views"] == []
    said = [t for t in read["texts"] if "declared domain" in t]
    assert said == ["R-CC: outside the model's declared domain (view); not scored",
                    "L-CC: outside the model's declared domain (pixel size, view); not scored"]
    assert not any("not available" in t for t in read["texts"])
    assert_dciodvfy_clean(data, tmp_path / "sr-not-scored.dcm", ALLOWED_WARNINGS)
    assert_pixelmed_clean(dcmread(io.BytesIO(data)), PIXELMED_ALLOWED_WARNINGS)


@pytest.mark.slow
@pytest.mark.requires_bin("java")
def test_a_report_that_replaces_an_earlier_one_lists_it_and_says_so(
        sources: list[Dataset], heatmaps: dict[str, npt.NDArray[np.float32]], report: bytes,
        tmp_path: Path) -> None:
    """The run on four images after a late one replaces the run on three: its SR lists that
    SR in the Predecessor Documents Sequence and says so in the report-level text; an SR with
    its own UID (the same images sent twice) is not listed, and its UIDs do not change."""
    earlier = build_sr(sources[:3], _result(sources[:3], missing=(_key(sources[3]),)), MODEL,
                       SPEC, heatmaps=heatmaps)
    current = dcmread(io.BytesIO(report))
    data = to_bytes(build_sr(sources, _result(sources), MODEL, SPEC, heatmaps=heatmaps,
                             previous_versions=[earlier, current]))
    replacing = dcmread(io.BytesIO(data))
    assert (replacing.SOPInstanceUID, replacing.SeriesInstanceUID) == (
        current.SOPInstanceUID, current.SeriesInstanceUID)
    [study] = replacing.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, instance.ReferencedSOPClassUID,
            instance.ReferencedSOPInstanceUID) == (
        earlier.StudyInstanceUID, earlier.SeriesInstanceUID, earlier.SOPClassUID,
        earlier.SOPInstanceUID)
    texts = read_sr_scores(replacing)["texts"]
    assert texts[-1].startswith("This report replaces an earlier report of this study")
    assert not any("replaces" in text for text in read_sr_scores(current)["texts"])
    assert_dciodvfy_clean(data, tmp_path / "replacing.dcm", ALLOWED_WARNINGS)
    assert_pixelmed_clean(replacing, PIXELMED_ALLOWED_WARNINGS)

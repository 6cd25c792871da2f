"""The Mammography CAD SR (TID 4000): its tree as a workstation walks it, judged by two validators."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from node.vocabulary import MAMMOGRAPHY_CAD_SR
from pipelines.attribution import RESEARCH_USE_LABEL
from pipelines.cad_sr import build_cad_sr
from pipelines.findings import Finding, find_findings
from pipelines.results import ModelIdentity, OutputSpec, StudyResult, ViewScore
from tests.support.dciodvfy import assert_dciodvfy_clean, to_bytes
from tests.support.pixelmed import assert_pixelmed_clean
from tools.stack.make_study import make_study

pytestmark = pytest.mark.requires_bin("dciodvfy")

MODEL = ModelIdentity("mias-baseline", "0.2.0", operating_point=0.6, operating_point_name="balanced")
SPEC = OutputSpec(9903, "AI mammography CAD report", uid_root="1.2.826.0.1.3680043.10.999.")
PROBABILITIES = {"R-CC": 0.1, "L-CC": 0.82, "R-MLO": 0.2, "L-MLO": 0.71}
ROWS, COLUMNS = 256, 208


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    paths = make_study(tmp_path_factory.mktemp("study"), rows=ROWS, cols=COLUMNS, seed=31)
    return [dcmread(p, stop_before_pixels=True) for p in paths]


def _result(sources: list[Dataset]) -> StudyResult:
    views = tuple(
        ViewScore(str(s.SOPInstanceUID), str(s.SOPClassUID), str(s.SeriesInstanceUID),
                  str(s.ImageLaterality), str(s.ViewPosition),
                  PROBABILITIES[f"{s.ImageLaterality}-{s.ViewPosition}"])
        for s in sources
    )
    breasts: dict[str, float] = {}
    for view in views:
        breasts[view.laterality] = max(breasts.get(view.laterality, 0.0), view.probability)
    return StudyResult(str(sources[0].StudyInstanceUID), views, breasts, max(breasts.values()))


def _findings(heatmaps: list[np.ndarray]) -> list[tuple[Finding, ...]]:
    return [find_findings(heatmap, threshold=MODEL.operating_point) for heatmap in heatmaps]


def _heatmaps(result: StudyResult) -> list[np.ndarray]:
    """Two regions on L-CC (0.82 and 0.7), one on L-MLO, nothing above 0.6 on the right."""
    maps = []
    for view in result.views:
        heatmap = np.full((ROWS, COLUMNS), 0.05, np.float32)
        if view.view_key == "L-CC":
            heatmap[100:140, 60:110] = 0.7
            heatmap[120, 90] = 0.82
            heatmap[20:30, 150:170] = 0.7
        elif view.view_key == "L-MLO":
            heatmap[180:200, 40:52] = 0.71
        elif view.view_key == "R-CC":
            heatmap[50:60, 50:60] = 0.55  # below the operating point: no finding
        maps.append(heatmap)
    return maps


@pytest.fixture(scope="module")
def cad_sr(sources: list[Dataset]) -> Dataset:
    result = _result(sources)
    return dcmread(io.BytesIO(to_bytes(build_cad_sr(sources, result, _findings(_heatmaps(result)),
                                                    MODEL, SPEC))))


def _walk(item: Dataset, path: tuple[int, ...] = (1,)) -> Iterator[tuple[tuple[int, ...], Dataset]]:
    """Every content item with its position (PS3.3 C.17.3.2.5), the root being (1,)."""
    yield path, item
    for index, child in enumerate(item.get("ContentSequence", []), start=1):
        yield from _walk(child, (*path, index))


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue) if "ConceptNameCodeSequence" in item \
        else ""


def _children(item: Dataset, code_value: str) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if _name(c) == code_value]


def _value(item: Dataset) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


def test_is_a_mammography_cad_report_that_says_research_use_only(cad_sr: Dataset) -> None:
    assert cad_sr.SOPClassUID == MAMMOGRAPHY_CAD_SR
    assert cad_sr.Modality == "SR"
    assert _name(cad_sr) == "111036"
    assert cad_sr.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert "research use only" in cad_sr.SeriesDescription.lower()
    equipment = cad_sr.ContributingEquipmentSequence[-1]
    assert equipment.ManufacturerModelName == MODEL.name
    assert f"model {MODEL.version}" in list(equipment.SoftwareVersions)
    [summary] = _children(cad_sr, "111017")
    [description] = _children(summary, "111033")
    assert description.TextValue.startswith(RESEARCH_USE_LABEL)
    assert "not a probability of cancer" in description.TextValue
    assert "0.820" in description.TextValue  # the exam score, in words
    # The report is the node's, unread by anybody.
    assert (cad_sr.CompletionFlag, cad_sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")


def test_image_library_lists_every_scored_view_with_laterality_and_view(
        cad_sr: Dataset, sources: list[Dataset]) -> None:
    [library] = _children(cad_sr, "111028")
    entries = list(library.ContentSequence)
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == \
           [s.SOPInstanceUID for s in sources]
    sides = {"R": "73056007", "L": "80248007"}
    views = {"CC": "399162004", "MLO": "399368009"}
    for entry, source in zip(entries, sources, strict=True):
        assert _value(_children(entry, "111027")[0]) == sides[source.ImageLaterality]
        assert _value(_children(entry, "111031")[0]) == views[source.ViewPosition]
        assert _children(entry, "110910")[0].MeasuredValueSequence[0].NumericValue == ROWS
    evidence = cad_sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {r.ReferencedSOPInstanceUID for series in evidence.ReferencedSeriesSequence
                  for r in series.ReferencedSOPSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}


def test_each_finding_is_a_region_drawn_on_its_own_image(
        cad_sr: Dataset, sources: list[Dataset]) -> None:
    result = _result(sources)
    expected = [(view, finding)
                for view, heatmap in zip(result.views, _heatmaps(result), strict=True)
                for finding in find_findings(heatmap, threshold=MODEL.operating_point)]
    assert [view.view_key for view, _ in expected] == ["L-CC", "L-CC", "L-MLO"]
    items = dict(_walk(cad_sr))
    [summary] = _children(cad_sr, "111017")
    assert _value(summary) == "111242"  # all algorithms succeeded; with findings
    impressions = _children(summary, "111034")
    assert len(impressions) == len(expected)
    for impression, (view, finding) in zip(impressions, expected, strict=True):
        assert _value(_children(impression, "111056")[0]) == "111150"  # presentation required
        [single] = _children(impression, "111059")
        assert _value(single) == "111099"  # selected region: the model does not type lesions
        assert not _children(single, "111047")  # never "probability of cancer"
        [certainty] = _children(single, "111012")
        assert float(certainty.MeasuredValueSequence[0].NumericValue) == \
               pytest.approx(100 * finding.score, abs=0.01)
        [centre] = _children(single, "111010")
        assert centre.GraphicType == "POINT"
        assert list(centre.GraphicData) == pytest.approx(list(finding.peak))
        [outline] = _children(single, "111041")
        assert outline.GraphicType == "ELLIPSE"
        for scoord in (centre, outline):
            [reference] = scoord.ContentSequence
            assert reference.RelationshipType == "SELECTED FROM"
            image = items[tuple(reference.ReferencedContentItemIdentifier)]
            assert image.ValueType == "IMAGE"
            assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == view.sop_uid
        [description] = _children(single, "111058")
        assert view.view_key in description.TextValue and RESEARCH_USE_LABEL in \
            description.TextValue


def test_detection_and_operating_point_are_identified(cad_sr: Dataset) -> None:
    [detections] = _children(cad_sr, "111064")
    assert _value(detections) == "111222"  # succeeded
    [performed] = _children(_children(detections, "111063")[0], "111022")
    texts = {(_name(i), str(i.TextValue)) for i in performed.ContentSequence
             if i.get("ValueType") == "TEXT"}
    assert ("111001", MODEL.name) in texts and ("111003", MODEL.version) in texts
    assert ("111002", "operating_point=0.6") in texts
    assert ("111002", "operating_point_name=balanced") in texts
    [maximum] = _children(performed, "111072")
    assert maximum.MeasuredValueSequence[0].NumericValue == 0  # one operating point
    [analyses] = _children(cad_sr, "111065")
    assert _value(analyses) == "111225"  # not attempted


def test_uids_are_deterministic_and_follow_the_operating_point(sources: list[Dataset]) -> None:
    result = _result(sources)
    first = build_cad_sr(sources, result, _findings(_heatmaps(result)), MODEL, SPEC)
    again = build_cad_sr(sources, result, _findings(_heatmaps(result)), MODEL, SPEC)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == \
           (again.SOPInstanceUID, again.SeriesInstanceUID)
    other = ModelIdentity(MODEL.name, MODEL.version, operating_point=0.75)
    moved = build_cad_sr(sources, result, _findings(_heatmaps(result)), other, SPEC)
    assert moved.SOPInstanceUID != first.SOPInstanceUID
    assert first.SOPInstanceUID.startswith(SPEC.uid_root or "")


def test_no_finding_says_so(sources: list[Dataset], tmp_path: Path) -> None:
    result = _result(sources)
    quiet = [np.zeros((ROWS, COLUMNS), np.float32) for _ in result.views]
    data = to_bytes(build_cad_sr(sources, result, _findings(quiet), MODEL, SPEC))
    report = dcmread(io.BytesIO(data))
    [summary] = _children(report, "111017")
    assert _value(summary) == "111241"  # all algorithms succeeded; without findings
    assert not _children(summary, "111034")
    assert_dciodvfy_clean(data, tmp_path / "quiet.dcm", allowed_warnings=set())


def test_refuses_findings_that_do_not_match_the_views(sources: list[Dataset]) -> None:
    result = _result(sources)
    with pytest.raises(ValueError, match="findings"):
        build_cad_sr(sources, result, _findings(_heatmaps(result))[:2], MODEL, SPEC)
    with pytest.raises(ValueError, match="not among the sources"):
        build_cad_sr(sources[:2], result, _findings(_heatmaps(result)), MODEL, SPEC)


def test_dciodvfy_finds_nothing(cad_sr: Dataset, tmp_path: Path) -> None:
    assert_dciodvfy_clean(to_bytes(cad_sr), tmp_path / "cad.dcm", allowed_warnings=set())


@pytest.mark.slow
@pytest.mark.requires_bin("java")
def test_pixelmed_finds_nothing(cad_sr: Dataset) -> None:
    """pixelmed knows TID 4000 and its sub-templates: no error and no warning at all."""
    report = assert_pixelmed_clean(cad_sr, allowed_warnings={})
    assert "Found MammographyCADSR IOD" in report.output
    assert "Found Root Template TID_4000" in report.output


@pytest.mark.parametrize("name", [
    "Yamada^Tarou=山田^太郎=やまだ^たろう",  # one value, three component groups, UTF-8
    ["Müller^Jürgen", "Mueller^Juergen"],  # two values: PS3.6 says VM 1, senders send two
])
def test_carries_the_patient_name_as_received(sources: list[Dataset], tmp_path: Path,
                                              name: str | list[str]) -> None:
    """Any source value is written back as received (pipelines/source_values.py)."""
    named = []
    for source in sources:
        renamed = copy.deepcopy(source)  # Dataset(source) would share the fixture's elements
        renamed.SpecificCharacterSet = "ISO_IR 192"
        renamed.PatientName = name
        del renamed.AccessionNumber  # type 2, may be missing from a source
        named.append(renamed)
    result = _result(named)
    data = to_bytes(build_cad_sr(named, result, _findings(_heatmaps(result)), MODEL, SPEC))
    report = dcmread(io.BytesIO(data))
    assert report.SpecificCharacterSet == "ISO_IR 192"
    assert report["PatientName"].value == named[0]["PatientName"].value
    if isinstance(name, str):  # dciodvfy rightly flags the source's second value, so not then
        assert_dciodvfy_clean(data, tmp_path / "named.dcm", allowed_warnings=set())


def test_views_outside_the_domain_are_named_in_the_impression(sources: list[Dataset],
                                                              tmp_path: Path) -> None:
    result = _result(sources)
    flagged = result.views[0]
    data = to_bytes(build_cad_sr(sources, result, _findings(_heatmaps(result)), MODEL, SPEC,
                                 {flagged.sop_uid: ["pixel_spacing"]}))
    report = dcmread(io.BytesIO(data))
    [summary] = _children(report, "111017")
    [description] = _children(summary, "111033")
    assert description.TextValue.endswith(
        f" {flagged.view_key}: outside the model's declared domain (pixel size); its score was "
        "not validated on such images.")
    assert description.TextValue.count("declared domain") == 1
    assert_dciodvfy_clean(data, tmp_path / "outside.dcm", allowed_warnings=set())


def test_views_left_unscored_outside_the_domain_are_said_in_the_impression(
        sources: list[Dataset], tmp_path: Path) -> None:
    """`scoring.outside_domain: skip`: the impression says which received views have no score
    and why, and does not call them not available."""
    from dataclasses import replace

    mlo = [s for s in sources if s.ViewPosition == "MLO"]
    result = replace(_result(mlo), not_scored=(("R-CC", ("view",)), ("L-CC", ("view",))))
    data = to_bytes(build_cad_sr(mlo, result, _findings(_heatmaps(result)), MODEL, SPEC))
    report = dcmread(io.BytesIO(data))
    [summary] = _children(report, "111017")
    [description] = _children(summary, "111033")
    assert description.TextValue.endswith(
        " R-CC: outside the model's declared domain (view); not scored. L-CC: outside the "
        "model's declared domain (view); not scored.")
    assert "not available" not in description.TextValue
    assert_dciodvfy_clean(data, tmp_path / "not-scored.dcm", allowed_warnings=set())
    assert_pixelmed_clean(report, allowed_warnings={})


def test_a_report_that_replaces_an_earlier_one_lists_it_and_says_so(
        sources: list[Dataset], tmp_path: Path) -> None:
    """A late fourth image: the run on all four replaces the run on three. Its CAD SR lists the
    earlier one as a predecessor document and says so in the impression; the earlier one is
    not its own predecessor (the same images sent twice give the same report)."""
    earlier_sources = sources[:3]
    earlier_result = _result(earlier_sources)
    earlier = build_cad_sr(earlier_sources, earlier_result,
                           _findings(_heatmaps(earlier_result)), MODEL, SPEC)
    result = _result(sources)
    same = build_cad_sr(sources, result, _findings(_heatmaps(result)), MODEL, SPEC)
    data = to_bytes(build_cad_sr(sources, result, _findings(_heatmaps(result)), MODEL, SPEC,
                                 previous_versions=[earlier, same]))
    report = dcmread(io.BytesIO(data))
    assert report.SOPInstanceUID == same.SOPInstanceUID  # its identity does not change
    [study] = report.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == earlier.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == earlier.SeriesInstanceUID
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in series.ReferencedSOPSequence] == [(MAMMOGRAPHY_CAD_SR,
                                                        earlier.SOPInstanceUID)]
    [summary] = _children(report, "111017")
    [description] = _children(summary, "111033")
    assert description.TextValue.endswith(
        " This report replaces an earlier report of this study from this node, made on fewer "
        "of its images, or by another model or operating point (listed as predecessor "
        "documents): read this one.")
    assert "PredecessorDocumentsSequence" not in same
    assert_dciodvfy_clean(data, tmp_path / "replacing.dcm", allowed_warnings=set())
    assert_pixelmed_clean(report, allowed_warnings={})

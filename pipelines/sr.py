"""The TID 1500 Comprehensive 3D SR: per-view, per-breast and per-exam scores, and the findings.

Every measurement group is a TID 1410 planar ROI group whose Image Region (SCOORD) sits on one
source image, so viewers that only load geometric groups (OHIF 3.13 throws on a group without
SCOORD) list and draw all of them:

- "finding R-CC 1".. (`pipelines/findings.py`, at most a few per image): an ELLIPSE around the
  region of the heatmap at or above the operating point, with its region score (the heatmap's
  peak inside it).
- "view R-CC": a POINT at the peak of that image's heatmap (the model's score is the peak of
  its smoothed heatmap inside the breast, models/*/metadata.json), with the view's score.
- "breast R", "exam": a POINT at the heatmap peak of the image that gave the maximum (the breast
  score is the maximum of its views, the exam score the maximum of the breasts); the score's
  measurement lists every image it was computed from.

Each score group carries the probability as a measurement referencing the images it was computed
from, a qualitative evaluation against the model's operating point, the algorithm's name and
version (and the operating point, as a parameter), and the finding site (breast, with
laterality; "bilateral" for the exam). Views a screening exam should have but this one lacks are
coded in the exam group. A report-level "Qualitative Evaluations" container says, as text, that
the report is for research use only and what the exam and breast scores are, for readers that
show text rather than measurements, and names each view outside the model's declared domain (the
worker's `outside_domain:` quality flags) with the reasons. The observer is the node itself (a
device): nobody has read this yet, so the report is COMPLETE but UNVERIFIED. Contributing
Equipment names the model and our software (`pipelines/attribution.py`).

Codes: standard ones where they exist, else our private scheme `99MAMMONODE` (the "99" prefix
marks a private designator, PS3.16 8.2), declared in the Coding Scheme Identification Sequence.

- document title: 126000 DCM "Imaging Measurement Report"
- procedure reported: 363679005 SCT "Imaging procedure" (CID 100 has no mammography code); the
  document's Performed Procedure Code is 24606-6 LN "MG Breast Screening"
- the score (NUM): MN001 99MAMMONODE "Abnormality score", unit {probability} UCUM
- a finding's score (NUM): MN006 "Region score" (heatmap peak in the region), unit {probability}
- verdict (CODE): MN002 "Suspicion at operating point" = MN003 "Suspicious" | MN004 "Not suspicious"
- missing view (CODE, exam group): MN005 "Screening view not available" = MN10..MN13 "Missing R-CC"..
- image view (CODE, view groups): 111031 DCM "Image View" = 399162004 SCT "cranio-caudal" |
  399368009 SCT "medio-lateral oblique"
- finding site: 76752008 SCT "Breast", laterality 24028007 SCT "Right" | 7771000 SCT "Left" |
  51440002 SCT "Bilateral" (exam)
- report-level text: 121106 DCM "Comment"

Why private codes for the score: the bundled model scores "abnormality needing work-up (benign or
malignant) versus normal" (its metadata.json), which is not DCM 111047 "Probability of cancer";
claiming cancer would misstate what the number means. The verdict is not a BI-RADS assessment
either (that is a radiologist's judgement), so it is not coded with one. It is deliberately not
named "Finding": highdicom fills Finding (121071) itself, and its reader would drop ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import CodedConcept, ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.uids import derive_uid
from node.version import software_version
from node.vocabulary import SEGMENTATION
from pipelines.attribution import (
    RESEARCH_USE_LABEL,
    contributing_equipment,
    domain_texts,
    replaces_text,
    series_description,
)
from pipelines.findings import Finding, find_findings
from pipelines.results import SCREENING_VIEWS, ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.source_values import carry_source_values, highdicom_safe

SCHEME = "99MAMMONODE"
SCHEME_NAME = "mammo-node local codes"
ABNORMALITY_SCORE = CodedConcept("MN001", SCHEME, "Abnormality score")
SUSPICION_AT_OPERATING_POINT = CodedConcept("MN002", SCHEME, "Suspicion at operating point")
SUSPICIOUS = CodedConcept("MN003", SCHEME, "Suspicious")
NOT_SUSPICIOUS = CodedConcept("MN004", SCHEME, "Not suspicious")
MISSING_VIEW = CodedConcept("MN005", SCHEME, "Screening view not available")
REGION_SCORE = CodedConcept("MN006", SCHEME, "Region score")
VIEW_CODES = {key: CodedConcept(f"MN1{index}", SCHEME, f"Missing {key}")
              for index, key in enumerate(SCREENING_VIEWS)}
PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")
PROCEDURE_REPORTED = CodedConcept("363679005", "SCT", "Imaging procedure")
SCREENING_PROCEDURE = CodedConcept("24606-6", "LN", "MG Breast Screening")
IMAGE_VIEW = CodedConcept("111031", "DCM", "Image View")
VIEW_POSITION_CODES = {
    "CC": CodedConcept("399162004", "SCT", "cranio-caudal"),
    "MLO": CodedConcept("399368009", "SCT", "medio-lateral oblique"),
}
LATERALITY_CODES = {"R": codes.SCT.Right, "L": codes.SCT.Left}
BOTH_BREASTS = CodedConcept("51440002", "SCT", "Bilateral")
BREAST = codes.SCT.Breast
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = CodedConcept("121106", "DCM", "Comment")
SEGMENTATION_SOP_CLASS_UIDS = frozenset({str(SEGMENTATION)})


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """Name and version, plus the operating point the verdicts were taken at."""
    parameters = [f"operating_point={model.operating_point:g}",
                  f"operating_point_name={model.operating_point_name}"]
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                          parameters=parameters)


def _verdict(probability: float, model: ModelIdentity) -> CodedConcept:
    return SUSPICIOUS if probability >= model.operating_point else NOT_SUSPICIOUS


def _site(laterality: str | None) -> list[hd.sr.FindingSite]:
    """The breast, with its laterality; None means both breasts (the exam)."""
    side = LATERALITY_CODES[laterality] if laterality else BOTH_BREASTS
    return [hd.sr.FindingSite(BREAST, laterality=side)]


def _peak(heatmap: npt.NDArray[np.floating]) -> tuple[float, float]:
    """(column, row) of the heatmap's maximum, at the pixel centre (PS3.3 C.18.6.1.2)."""
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float(column) + 0.5, float(row) + 0.5


def _region(graphic_type: str, points: Sequence[tuple[float, float]],
            image: Dataset) -> hd.sr.ImageRegion:
    return hd.sr.ImageRegion(graphic_type=graphic_type,
                             graphic_data=np.asarray(points, dtype=np.float64),
                             source_image=hd.sr.SourceImageForRegion.from_source_image(image))


def _score_group(
    tracking: str,
    tracking_uid: str,
    probability: float,
    model: ModelIdentity,
    laterality: str | None,
    anchor: hd.sr.ImageRegion,
    sources: Sequence[Dataset],
    extra_evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A view, breast or exam score, drawn as a point where the deciding heatmap peaks."""
    references = [hd.sr.SourceImageForMeasurement.from_source_image(s) for s in sources]
    measurement = hd.sr.Measurement(
        name=ABNORMALITY_SCORE,
        value=round(float(probability), 6),
        unit=PROBABILITY_UNIT,
        algorithm_id=_algorithm(model),
        finding_sites=_site(laterality),
        referenced_images=references or None,
    )
    verdict = hd.sr.QualitativeEvaluation(SUSPICION_AT_OPERATING_POINT,
                                          _verdict(probability, model))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking),
        referenced_region=anchor,
        algorithm_id=_algorithm(model),
        finding_sites=_site(laterality),
        measurements=[measurement],
        qualitative_evaluations=[verdict, *extra_evaluations],
    )


def _finding_group(
    tracking: str, tracking_uid: str, finding: Finding, view: ViewScore, source: Dataset,
    model: ModelIdentity,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One region of the heatmap at or above the operating point, outlined by an ellipse."""
    measurement = hd.sr.Measurement(
        name=REGION_SCORE,
        value=round(float(finding.score), 6),
        unit=PROBABILITY_UNIT,
        algorithm_id=_algorithm(model),
        finding_sites=_site(view.laterality),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking),
        referenced_region=_region("ELLIPSE", finding.ellipse(), source),
        algorithm_id=_algorithm(model),
        finding_sites=_site(view.laterality),
        measurements=[measurement],
    )


def _summary_texts(result: StudyResult, model: ModelIdentity) -> list[str]:
    """The exam and breast scores as sentences, for readers that show an SR as text."""
    point = f"operating point {model.operating_point:g} ({model.operating_point_name})"

    def line(what: str, probability: float) -> str:
        verdict = _verdict(probability, model).meaning.lower()
        return f"{what} abnormality score {probability:.3f}: {verdict} at {point}"

    names = {"R": "Right breast", "L": "Left breast"}
    texts = [line("Exam", result.exam_score)]
    texts += [line(names.get(side, side), probability)
              for side, probability in sorted(result.breast_scores.items(), reverse=True)]
    if result.missing_views:
        texts.append("Screening views not available: " + ", ".join(result.missing_views))
    return texts


def _qualitative_evaluations(texts: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the report-level Qualitative Evaluations, as TEXT items."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=COMMENT, value=text[:1024],
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in texts
    ])
    return container


def _check_sources(sources: Sequence[Dataset], result: StudyResult,
                   heatmaps: Mapping[str, npt.NDArray[np.floating]]) -> dict[str, Dataset]:
    """Refuse a report whose numbers could land in another study or point at a missing image."""
    if not result.views:
        raise ValueError("result.views: no scored view to report")
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    foreign = sorted(uid for uid, s in by_uid.items() if s.StudyInstanceUID != result.study_uid)
    if foreign:
        raise ValueError(f"sources: not in study {result.study_uid}: {foreign}")
    unknown = sorted(v.sop_uid for v in result.views if v.sop_uid not in by_uid)
    if unknown:
        raise ValueError(f"result.views: scores for images not among the sources: {unknown}")
    for view in result.views:
        heatmap = heatmaps.get(view.sop_uid)
        source = by_uid[view.sop_uid]
        if heatmap is None:
            raise ValueError(f"heatmaps: none for scored image {view.sop_uid}")
        if heatmap.shape != (int(source.Rows), int(source.Columns)):
            raise ValueError(f"heatmaps: {view.sop_uid} is {heatmap.shape}, its image is "
                             f"{(int(source.Rows), int(source.Columns))}")
    return by_uid


def build_sr(
    sources: Sequence[Dataset],
    result: StudyResult,
    model: ModelIdentity,
    output: OutputSpec,
    heatmaps: Mapping[str, npt.NDArray[np.floating]],
    findings: Mapping[str, Sequence[Finding]] | None = None,
    seg_refs: Sequence[Dataset] = (),
    outside_domain: Mapping[str, Sequence[str]] | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The report for one run; UIDs derive from the study, the source images and the model.

    `heatmaps` maps each scored image's SOP Instance UID to its heatmap on that image's grid
    (Rows × Columns): the score anchors come from them, and the findings unless `findings` (by
    the same UIDs, from `find_findings` at the model's operating point) are given. `seg_refs`
    (the heatmap SEGs of this run, headers suffice) are listed as evidence, so a viewer can get
    from the report to the heatmaps; they do not change the report's UIDs. `outside_domain`
    (source SOP Instance UID -> `pipelines/quality.py` outside_domain reasons, e.g.
    "pixel_spacing") adds a report-level sentence per such view. `previous_versions` (headers
    of our earlier SRs of the study, from runs this one supersedes) go into the Predecessor
    Documents Sequence, with a sentence saying this report replaces them; one with this
    report's own UID (the same images, model and point) is not its predecessor.
    """
    by_uid = _check_sources(sources, result, heatmaps)
    source_key = sorted(by_uid)
    # The operating point changes the verdicts, so it is part of the report's identity too.
    uid_parts = ("sr", result.study_uid, model.name, model.version,
                 f"{model.operating_point:.6g}", *source_key)

    def uid(*extra: str) -> str:
        return derive_uid(output.uid_root, *uid_parts, *extra)

    peaks = {view.sop_uid: _peak(heatmaps[view.sop_uid]) for view in result.views}

    def anchor(view: ViewScore) -> hd.sr.ImageRegion:
        """A point at the peak of the view's heatmap, on its image."""
        return _region("POINT", [peaks[view.sop_uid]], by_uid[view.sop_uid])

    def deciding(views: Sequence[ViewScore]) -> ViewScore:
        return max(views, key=lambda v: v.probability)  # the first of equals

    # Exam first, then breasts, views and findings: the order a viewer lists them in.
    missing = [hd.sr.QualitativeEvaluation(MISSING_VIEW, VIEW_CODES[key])
               for key in result.missing_views]
    groups = [_score_group("exam", uid("exam"), result.exam_score, model, None,
                           anchor(deciding(result.views)),
                           [by_uid[v.sop_uid] for v in result.views], missing)]
    for laterality, probability in sorted(result.breast_scores.items(), reverse=True):
        breast_views = [v for v in result.views if v.laterality == laterality]
        groups.append(_score_group(
            f"breast {laterality}", uid("breast", laterality), probability, model, laterality,
            anchor(deciding(breast_views)), [by_uid[v.sop_uid] for v in breast_views]))
    for view in result.views:
        source = by_uid[view.sop_uid]
        view_code = VIEW_POSITION_CODES.get(view.view)
        extra = [hd.sr.QualitativeEvaluation(IMAGE_VIEW, view_code)] if view_code else []
        groups.append(_score_group(f"view {view.view_key}", uid("view", view.view_key),
                                   view.probability, model, view.laterality, anchor(view),
                                   [source], extra))
    for view in result.views:
        marks = (findings[view.sop_uid] if findings is not None
                 else find_findings(heatmaps[view.sop_uid], threshold=model.operating_point))
        for number, finding in enumerate(marks, start=1):
            groups.append(_finding_group(
                f"finding {view.view_key} {number}", uid("finding", view.sop_uid, str(number)),
                finding, view, by_uid[view.sop_uid], model))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(output.uid_root, "device", output.manufacturer),
            name=output.manufacturer,
            manufacturer_name=output.manufacturer,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    content = report[0]
    previous = [p for p in previous_versions if str(p.SOPInstanceUID) != uid("instance")]
    content.ContentSequence.append(
        _qualitative_evaluations([RESEARCH_USE_LABEL, *_summary_texts(result, model),
                                  *domain_texts(result, outside_domain or {}),
                                  *([replaces_text(len(previous))] if previous else [])]))
    sr = hd.sr.Comprehensive3DSR(
        # highdicom reads the patient and study from the first evidence; see source_values.py.
        evidence=[*(highdicom_safe(s) for s in sources), *seg_refs],
        content=content,
        series_instance_uid=uid("series"),
        series_number=output.series_number,
        sop_instance_uid=uid("instance"),
        instance_number=1,
        manufacturer=output.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[SCREENING_PROCEDURE],
        previous_versions=previous or None,
        series_description=series_description(output.series_description),
        software_versions=software_version()[:64],
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=SCHEME, name=SCHEME_NAME, responsible_organization="mammo-node project"
            )
        ],
    )
    carry_source_values(sources[0], sr)
    # Assigned as an element: highdicom types this attribute as its own ContributingEquipment.
    sr.add_new("ContributingEquipmentSequence", "SQ", contributing_equipment(model))
    return sr


class FindingMark(TypedDict):
    """One finding as `read_sr_scores` reads it back."""

    view: str  # view key ("R-CC")
    sop_uid: str  # the source image it is drawn on
    score: float | None  # the heatmap's peak inside the region
    graphic_type: str  # "ELLIPSE"
    points: list[tuple[float, float]]  # (column, row) image coordinates


class SRScores(TypedDict):
    """What one of our SRs says, as `read_sr_scores` reads it back."""

    views: dict[str, float | None]  # view key ("R-CC") -> probability
    views_by_sop_uid: dict[str, float | None]  # source SOP Instance UID -> probability
    breasts: dict[str, float | None]  # "R" | "L" -> probability
    exam: float | None
    qualitative: dict[str, str | None]  # tracking id -> "Suspicious" | "Not suspicious"
    model: dict[str, str]  # {"name", "version"}
    missing_views: list[str]  # view keys, in screening order
    seg_sop_uids: list[str]  # the SEGs listed as evidence
    findings: list[FindingMark]  # in report order: by view, strongest first
    texts: list[str]  # the report-level text items (research-use label, score sentences)


def _text_values(group: Dataset, name: Code) -> list[str]:
    """TEXT items of that name anywhere in a group (the algorithm identification of TID 4019
    sits under the measurement, and highdicom has no accessor for it)."""
    return [str(item.TextValue)
            for item in find_content_items(group, name=name, value_type=ValueTypeValues.TEXT,
                                           recursive=True)]


def _coded_meaning(value: object) -> str:
    """The meaning of a qualitative evaluation's coded value."""
    return str(value.meaning) if isinstance(value, CodedConcept) else str(value)


def _region_image(region: Dataset) -> str:
    """The SOP Instance UID an Image Region is drawn on (its SELECTED FROM IMAGE item)."""
    return str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _report_texts(report: Dataset) -> list[str]:
    """TEXT items of the report-level Qualitative Evaluations container."""
    texts = []
    for container in find_content_items(report, name=QUALITATIVE_EVALUATIONS,
                                        value_type=ValueTypeValues.CONTAINER):
        texts += [str(item.TextValue) for item in container.get("ContentSequence", [])
                  if item.ValueType == "TEXT"]
    return texts


def read_sr_scores(ds: Dataset) -> SRScores:
    """Scores and findings from one of our SRs, for the tests and the demo.

    Read through highdicom's TID 1500 reader, which also checks that the document is a
    Comprehensive 3D SR holding a Measurement Report. `views_by_sop_uid` is unambiguous when a
    view was imaged twice; `missing_views` come from the exam group's evaluations.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 Measurement Report")
    scores = SRScores(
        views={}, views_by_sop_uid={}, breasts={}, exam=None, qualitative={}, model={},
        missing_views=[],
        seg_sop_uids=[str(sop_uid) for _, _, sop_uid, sop_class_uid in sr.get_evidence()
                      if sop_class_uid in SEGMENTATION_SOP_CLASS_UIDS],
        findings=[], texts=_report_texts(report[0]),
    )
    missing: set[str] = set()
    for group in report.get_planar_roi_measurement_groups():
        tracking = group.tracking_identifier or ""
        kind, _, key = tracking.partition(" ")
        for key_name, name in (("name", codes.DCM.AlgorithmName),
                               ("version", codes.DCM.AlgorithmVersion)):
            for value in _text_values(group[0], name):
                scores["model"][key_name] = value
        if kind == "finding":
            region_scores = group.get_measurements(name=REGION_SCORE)
            roi = group.roi
            if roi is None:
                raise ValueError(f"{tracking}: finding without an image region")
            data = np.asarray(roi.value, dtype=np.float64).reshape(-1, 2)
            scores["findings"].append(FindingMark(
                view=key.rsplit(" ", 1)[0], sop_uid=_region_image(roi),
                score=float(region_scores[0].value) if region_scores else None,
                graphic_type=str(roi.graphic_type.value),
                points=[(float(c), float(r)) for c, r in data]))
            continue
        measurements = group.get_measurements(name=ABNORMALITY_SCORE)
        probability = float(measurements[0].value) if measurements else None
        images = [str(image.referenced_sop_instance_uid)
                  for measurement in measurements for image in measurement.referenced_images]
        evaluations = group.get_qualitative_evaluations(name=SUSPICION_AT_OPERATING_POINT)
        scores["qualitative"][tracking] = (_coded_meaning(evaluations[0].value)
                                           if evaluations else None)
        missing.update(_coded_meaning(evaluation.value).removeprefix("Missing ")
                       for evaluation in group.get_qualitative_evaluations(name=MISSING_VIEW))
        if kind == "view":
            scores["views"][key] = probability
            for sop_uid in images:
                scores["views_by_sop_uid"][sop_uid] = probability
        elif kind == "breast":
            scores["breasts"][key] = probability
        elif kind == "exam":
            scores["exam"] = probability
    order = {key: index for index, key in enumerate(SCREENING_VIEWS)}
    scores["missing_views"] = sorted(missing, key=lambda k: order.get(k, len(order)))
    return scores

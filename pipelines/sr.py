"""The TID 1500 Comprehensive 3D SR: per-view, per-breast and per-exam scores.

One measurement group per scored image (tracking id "view R-CC"), per breast ("breast R") and
for the exam ("exam"). Each carries the probability as a measurement that references the images it
was computed from, a qualitative evaluation against the model's operating point, the algorithm's
name and version (and the operating point, as a parameter), and the finding site (breast, with
laterality; "right and left" for the exam). Views that a screening exam should have but this one
lacks are coded in the exam group. The observer is the node itself (a device): nobody has read
this yet, so the report is COMPLETE but UNVERIFIED.

Codes: standard ones where they exist, else our private scheme `99MAMMONODE` (the "99" prefix
marks a private designator, PS3.16 8.2), declared in the Coding Scheme Identification Sequence.

- document title: 126000 DCM "Imaging Measurement Report"
- procedure reported: 24606-6 LN "MG Breast Screening"
- the score (NUM): MN001 99MAMMONODE "Abnormality score", unit {probability} UCUM
- verdict (CODE): MN002 "Suspicion at operating point" = MN003 "Suspicious" | MN004 "Not suspicious"
- missing view (CODE, exam group): MN005 "Screening view not available" = MN10..MN13 "Missing R-CC"..
- image view (CODE, view groups): 111031 DCM "Image View" = 399162004 SCT "cranio-caudal" |
  399368009 SCT "medio-lateral oblique"
- finding site: 76752008 SCT "Breast", laterality 24028007 SCT "Right" | 7771000 SCT "Left" |
  51440002 SCT "Right and left" (exam)

Why private codes for the score: the bundled model scores "abnormality needing work-up (benign or
malignant) versus normal" (its metadata.json), which is not DCM 111047 "Probability of cancer";
claiming cancer would misstate what the number means. The verdict is not a BI-RADS assessment
either (that is a radiologist's judgement), so it is not coded with one. It is deliberately not
named "Finding": highdicom fills Finding (121071) itself, and its reader would drop ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import highdicom as hd
from highdicom.sr import CodedConcept, ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.uids import derive_uid
from node.vocabulary import SEGMENTATION
from pipelines.results import SCREENING_VIEWS, ModelIdentity, OutputSpec, StudyResult

SCHEME = "99MAMMONODE"
SCHEME_NAME = "mammo-node local codes"
ABNORMALITY_SCORE = CodedConcept("MN001", SCHEME, "Abnormality score")
SUSPICION_AT_OPERATING_POINT = CodedConcept("MN002", SCHEME, "Suspicion at operating point")
SUSPICIOUS = CodedConcept("MN003", SCHEME, "Suspicious")
NOT_SUSPICIOUS = CodedConcept("MN004", SCHEME, "Not suspicious")
MISSING_VIEW = CodedConcept("MN005", SCHEME, "Screening view not available")
VIEW_CODES = {key: CodedConcept(f"MN1{index}", SCHEME, f"Missing {key}")
              for index, key in enumerate(SCREENING_VIEWS)}
PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")
SCREENING_PROCEDURE = CodedConcept("24606-6", "LN", "MG Breast Screening")
IMAGE_VIEW = CodedConcept("111031", "DCM", "Image View")
VIEW_POSITION_CODES = {
    "CC": CodedConcept("399162004", "SCT", "cranio-caudal"),
    "MLO": CodedConcept("399368009", "SCT", "medio-lateral oblique"),
}
LATERALITY_CODES = {"R": codes.SCT.Right, "L": codes.SCT.Left}
BOTH_BREASTS = CodedConcept("51440002", "SCT", "Right and left")
BREAST = codes.SCT.Breast
SEGMENTATION_SOP_CLASS_UIDS = frozenset({str(SEGMENTATION)})


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """Name and version, plus the operating point the verdicts were taken at."""
    parameters = [f"operating_point={model.operating_point:g}",
                  f"operating_point_name={model.operating_point_name}"]
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                          parameters=parameters)


def _qualitative(probability: float, model: ModelIdentity) -> hd.sr.QualitativeEvaluation:
    value = SUSPICIOUS if probability >= model.operating_point else NOT_SUSPICIOUS
    return hd.sr.QualitativeEvaluation(SUSPICION_AT_OPERATING_POINT, value)


def _group(
    tracking: str,
    tracking_uid: str,
    probability: float,
    model: ModelIdentity,
    laterality: str | None,
    sources: Sequence[Dataset],
    extra_evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One group; laterality None means both breasts (the exam)."""
    side = LATERALITY_CODES[laterality] if laterality else BOTH_BREASTS
    site = [hd.sr.FindingSite(BREAST, laterality=side)]
    references = [hd.sr.SourceImageForMeasurement.from_source_image(s) for s in sources]
    measurement = hd.sr.Measurement(
        name=ABNORMALITY_SCORE,
        value=round(float(probability), 6),
        unit=PROBABILITY_UNIT,
        algorithm_id=_algorithm(model),
        finding_sites=site,
        referenced_images=references or None,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking),
        algorithm_id=_algorithm(model),
        finding_sites=site,
        measurements=[measurement],
        qualitative_evaluations=[_qualitative(probability, model), *extra_evaluations],
    )


def _check_sources(sources: Sequence[Dataset], result: StudyResult) -> dict[str, Dataset]:
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
    return by_uid


def build_sr(
    sources: Sequence[Dataset],
    result: StudyResult,
    model: ModelIdentity,
    output: OutputSpec,
    seg_refs: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The report for one run; UIDs derive from the study, the source images and the model.

    `seg_refs` (the heatmap SEGs of this run, headers suffice) are listed as evidence, so a viewer
    can get from the report to the heatmaps; they do not change the report's UIDs.
    """
    by_uid = _check_sources(sources, result)
    source_key = sorted(by_uid)
    # The operating point changes the verdicts, so it is part of the report's identity too.
    uid_parts = ("sr", result.study_uid, model.name, model.version,
                 f"{model.operating_point:.6g}", *source_key)

    def uid(*extra: str) -> str:
        return derive_uid(output.uid_root, *uid_parts, *extra)

    groups = []
    for view in result.views:
        source = by_uid[view.sop_uid]
        view_code = VIEW_POSITION_CODES.get(view.view)
        extra = [hd.sr.QualitativeEvaluation(IMAGE_VIEW, view_code)] if view_code else []
        groups.append(_group(f"view {view.view_key}", uid("view", view.view_key),
                             view.probability, model, view.laterality, [source], extra))
    for laterality, probability in sorted(result.breast_scores.items(), reverse=True):
        images = [by_uid[v.sop_uid] for v in result.views if v.laterality == laterality]
        groups.append(_group(f"breast {laterality}", uid("breast", laterality), probability,
                             model, laterality, images))
    missing = [hd.sr.QualitativeEvaluation(MISSING_VIEW, VIEW_CODES[key])
               for key in result.missing_views]
    scored = [by_uid[v.sop_uid] for v in result.views]
    groups.append(_group("exam", uid("exam"), result.exam_score, model, None, scored, missing))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(output.uid_root, "device", output.manufacturer),
            name=output.manufacturer,
            manufacturer_name=output.manufacturer,
            model_name=f"{model.name} {model.version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=SCREENING_PROCEDURE,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, *seg_refs],
        content=report[0],
        series_instance_uid=uid("series"),
        series_number=output.series_number,
        sop_instance_uid=uid("instance"),
        instance_number=1,
        manufacturer=output.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=output.series_description,
        software_versions=output.software_version,
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=SCHEME, name=SCHEME_NAME, responsible_organization="mammo-node project"
            )
        ],
    )
    return sr


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


def _text_values(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> list[str]:
    """TEXT items of that name anywhere in a group (the algorithm identification of TID 4019
    sits under the measurement, and highdicom has no accessor for it)."""
    return [str(item.TextValue)
            for item in find_content_items(group[0], name=name, value_type=ValueTypeValues.TEXT,
                                           recursive=True)]


def _coded_meaning(value: object) -> str:
    """The meaning of a qualitative evaluation's coded value."""
    return str(value.meaning) if isinstance(value, CodedConcept) else str(value)


def read_sr_scores(ds: Dataset) -> SRScores:
    """Scores from one of our SRs, for the tests and the demo to compare with what was scored.

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
    )
    missing: set[str] = set()
    for group in report.get_image_measurement_groups():
        tracking = group.tracking_identifier or ""
        measurements = group.get_measurements(name=ABNORMALITY_SCORE)
        probability = float(measurements[0].value) if measurements else None
        images = [str(image.referenced_sop_instance_uid)
                  for measurement in measurements for image in measurement.referenced_images]
        evaluations = group.get_qualitative_evaluations(name=SUSPICION_AT_OPERATING_POINT)
        scores["qualitative"][tracking] = (_coded_meaning(evaluations[0].value)
                                           if evaluations else None)
        missing.update(_coded_meaning(evaluation.value).removeprefix("Missing ")
                       for evaluation in group.get_qualitative_evaluations(name=MISSING_VIEW))
        for key, name in (("name", codes.DCM.AlgorithmName),
                          ("version", codes.DCM.AlgorithmVersion)):
            for value in _text_values(group, name):
                scores["model"][key] = value
        kind, _, key = tracking.partition(" ")
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

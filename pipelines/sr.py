"""The TID 1500 Comprehensive 3D SR: per-view, per-breast and per-exam scores.

One measurement group per scored image (tracking id "view R-CC"), per breast ("breast R") and
for the exam ("exam"). Each carries the probability as a measurement, a qualitative evaluation
against the model's operating point, the algorithm's name and version, and the finding site
(breast, with laterality). Views that a screening exam should have but this one lacks are coded
in the exam group. Standard codes (SCT, DCM, UCUM) where they exist; where none does, codes of
our private scheme `99MAMMONODE`, all defined in this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.uids import derive_uid
from pipelines.results import SCREENING_VIEWS, ModelIdentity, OutputSpec, StudyResult

SCHEME = "99MAMMONODE"
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
BREAST = codes.SCT.Breast


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


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
    site = [hd.sr.FindingSite(BREAST, laterality=LATERALITY_CODES[laterality])] if laterality else []
    references = [hd.sr.SourceImageForMeasurement.from_source_image(s) for s in sources]
    measurement = hd.sr.Measurement(
        name=ABNORMALITY_SCORE,
        value=round(float(probability), 6),
        unit=PROBABILITY_UNIT,
        algorithm_id=_algorithm(model),
        finding_sites=site or None,
        referenced_images=references or None,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking),
        algorithm_id=_algorithm(model),
        finding_sites=site or None,
        measurements=[measurement],
        qualitative_evaluations=[_qualitative(probability, model), *extra_evaluations],
    )


def build_sr(
    sources: Sequence[Dataset],
    result: StudyResult,
    model: ModelIdentity,
    output: OutputSpec,
) -> hd.sr.Comprehensive3DSR:
    """The report for one run; UIDs derive from the study, the source images and the model."""
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    source_key = sorted(by_uid)
    uid_parts = ("sr", result.study_uid, model.name, model.version, *source_key)

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
    groups.append(_group("exam", uid("exam"), result.exam_score, model, None, [], missing))

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
        evidence=list(sources),
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
    )
    sr.SoftwareVersions = output.software_version
    return sr


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _walk(items: Sequence[Dataset]) -> Any:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def read_sr_scores(ds: Dataset) -> dict[str, Any]:
    """Scores from one of our SRs: {views, breasts, exam, qualitative, model, missing_views}."""
    out: dict[str, Any] = {"views": {}, "breasts": {}, "exam": None, "qualitative": {},
                           "model": {}, "missing_views": []}
    for group in _walk(ds.ContentSequence):
        if _concept(group) != ("125007", "DCM") or "ContentSequence" not in group:
            continue  # not a Measurement Group
        tracking, probability, evaluation = "", None, None
        for item in _walk(group.ContentSequence):
            concept = _concept(item)
            if concept == ("112039", "DCM"):
                tracking = str(item.TextValue)
            elif concept == (ABNORMALITY_SCORE.value, SCHEME) and item.ValueType == "NUM":
                probability = float(item.MeasuredValueSequence[0].NumericValue)
            elif concept == (SUSPICION_AT_OPERATING_POINT.value, SCHEME):
                evaluation = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif concept == (MISSING_VIEW.value, SCHEME):
                meaning = str(item.ConceptCodeSequence[0].CodeMeaning)
                out["missing_views"].append(meaning.removeprefix("Missing "))
            elif concept == ("111001", "DCM"):
                out["model"]["name"] = str(item.TextValue)
            elif concept == ("111003", "DCM"):
                out["model"]["version"] = str(item.TextValue)
        kind, _, key = tracking.partition(" ")
        if kind == "view":
            out["views"][key] = probability
        elif kind == "breast":
            out["breasts"][key] = probability
        elif kind == "exam":
            out["exam"] = probability
        out["qualitative"][tracking] = evaluation
    order = {key: index for index, key in enumerate(SCREENING_VIEWS)}
    out["missing_views"] = sorted(set(out["missing_views"]), key=lambda k: order.get(k, 99))
    return out

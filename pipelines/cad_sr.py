"""The Mammography CAD SR (TID 4000): our findings in the object mammography workstations read.

highdicom has no builder for TID 4000, so the tree is assembled here from highdicom's content
items (and plain pydicom items where highdicom has no class: the name-less IMAGE of the Image
Library and the by-reference items that point at it), and wrapped in highdicom's SR document
base with the Mammography CAD SR SOP class. The tree, top down (PS3.16 TID 4000 and below):

- Mammography CAD Report (111036 DCM), language en-US (TID 1204)
- Image Library (111028 DCM): one IMAGE per scored view (TID 4020) with its laterality, view,
  patient orientation, dates, pixel spacing and size
- CAD Processing and Findings Summary (111017 DCM, TID 4001): "All algorithms succeeded; with
  findings" or "... without findings"; its body (TID 4002) is one Impression Description TEXT
  that starts "Research use only, not for diagnosis" and gives the exam and breast scores in
  words, with the algorithm (TID 4019); then one Individual Impression/Recommendation (TID 4003)
  per finding, "Presentation Required", holding its Single Image Finding (TID 4006)
- Summary of Detections (111064 DCM): Succeeded, with the one detection performed (TID 4017):
  its algorithm (TID 4019), the images it ran on, and its CAD operating points (TID 4023)
- Summary of Analyses (111065 DCM): Not Attempted (we correlate nothing across views)

What a finding is: a region of the view's heatmap at or above the model's operating point
(`pipelines/findings.py`, the same regions the TID 1500 SR and the SEG show). Each is coded
(111099 DCM) "Selected region" — "a specific area of interest noted within an image" — with a
Selected Region Description, its Center (the heatmap's peak, SCOORD POINT) and Outline (the
region's bounding ellipse, SCOORD ELLIPSE) on the source image, and its Certainty of Finding
(the heatmap's peak, in %).

Why not "Mass" or "Calcification Cluster", and why no "Probability of cancer" (111047): the
bundled model scores "abnormality needing work-up, benign or malignant, versus normal" and its
heatmap is a per-cell lesion likelihood; it does not type lesions and is not calibrated to
cancer (see pipelines/sr.py). "Selected region" with a described certainty is what it can
honestly claim; TID 4006 forbids "Probability of cancer" on a selected region anyway.

Why "Presentation Required" and operating point 0: the findings are only the regions at the
one operating point the node is configured with, so there is one CAD operating point (0, the
only one, also the recommended one: TID 4023) and every finding is meant to be shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import CodedConcept, RelationshipTypeValues
from highdicom.sr.sop import _SR
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.uids import derive_uid
from node.vocabulary import MAMMOGRAPHY_CAD_SR
from pipelines.attribution import (
    RESEARCH_USE_LABEL,
    contributing_equipment,
    domain_texts,
    replaces_text,
    series_description,
)
from pipelines.findings import Finding
from pipelines.results import ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.source_values import carry_source_values, highdicom_safe

Relation = RelationshipTypeValues

MAMMOGRAPHY_CAD_REPORT = CodedConcept("111036", "DCM", "Mammography CAD Report")
IMAGE_LIBRARY = CodedConcept("111028", "DCM", "Image Library")
LANGUAGE = CodedConcept("121049", "DCM", "Language of Content Item and Descendants")
ENGLISH_US = CodedConcept("en-US", "RFC5646", "English (United States)")
CAD_SUMMARY = CodedConcept("111017", "DCM", "CAD Processing and Findings Summary")
SUCCEEDED_WITH_FINDINGS = CodedConcept("111242", "DCM", "All algorithms succeeded; with findings")
SUCCEEDED_WITHOUT_FINDINGS = CodedConcept("111241", "DCM",
                                          "All algorithms succeeded; without findings")
IMPRESSION_DESCRIPTION = CodedConcept("111033", "DCM", "Impression Description")
INDIVIDUAL_IMPRESSION = CodedConcept("111034", "DCM", "Individual Impression/Recommendation")
RENDERING_INTENT = CodedConcept("111056", "DCM", "Rendering Intent")
PRESENTATION_REQUIRED = CodedConcept(
    "111150", "DCM", "Presentation Required: Rendering device is expected to present")
SINGLE_IMAGE_FINDING = CodedConcept("111059", "DCM", "Single Image Finding")
SELECTED_REGION = CodedConcept("111099", "DCM", "Selected region")
SELECTED_REGION_DESCRIPTION = CodedConcept("111058", "DCM", "Selected Region Description")
CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")
CENTER = CodedConcept("111010", "DCM", "Center")
OUTLINE = CodedConcept("111041", "DCM", "Outline")
SUMMARY_OF_DETECTIONS = CodedConcept("111064", "DCM", "Summary of Detections")
SUMMARY_OF_ANALYSES = CodedConcept("111065", "DCM", "Summary of Analyses")
SUCCEEDED = CodedConcept("111222", "DCM", "Succeeded")
NOT_ATTEMPTED = CodedConcept("111225", "DCM", "Not Attempted")
SUCCESSFUL_DETECTIONS = CodedConcept("111063", "DCM", "Successful Detections")
DETECTION_PERFORMED = CodedConcept("111022", "DCM", "Detection Performed")
MAXIMUM_OPERATING_POINT = CodedConcept("111072", "DCM", "Maximum CAD Operating Point")
RECOMMENDED_OPERATING_POINT = CodedConcept("111092", "DCM", "Recommended CAD Operating Point")
OPERATING_POINT_UNIT = CodedConcept("{0:n}", "UCUM", "range: 0:n")
ARBITRARY_UNIT = CodedConcept("[arb'U]", "UCUM", "arbitrary unit")  # TID 4023 row 1
ALGORITHM_NAME = CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = CodedConcept("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = CodedConcept("111002", "DCM", "Algorithm Parameters")
PERCENT = CodedConcept("%", "UCUM", "Percent")
PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")
MILLIMETRE = CodedConcept("mm", "UCUM", "millimeter")

IMAGE_LATERALITY = CodedConcept("111027", "DCM", "Image Laterality")
IMAGE_VIEW = CodedConcept("111031", "DCM", "Image View")
PATIENT_ORIENTATION_ROW = CodedConcept("111044", "DCM", "Patient Orientation Row")
PATIENT_ORIENTATION_COLUMN = CodedConcept("111043", "DCM", "Patient Orientation Column")
STUDY_DATE = CodedConcept("111060", "DCM", "Study Date")
STUDY_TIME = CodedConcept("111061", "DCM", "Study Time")
CONTENT_DATE = CodedConcept("111018", "DCM", "Content Date")
CONTENT_TIME = CodedConcept("111019", "DCM", "Content Time")
HORIZONTAL_PIXEL_SPACING = CodedConcept("111026", "DCM", "Horizontal Pixel Spacing")
VERTICAL_PIXEL_SPACING = CodedConcept("111066", "DCM", "Vertical Pixel Spacing")
PIXEL_DATA_ROWS = CodedConcept("110910", "DCM", "Pixel Data Rows")
PIXEL_DATA_COLUMNS = CodedConcept("110911", "DCM", "Pixel Data Columns")

# CID 6022 "Side" and CID 4014 "View for Mammography".
BREAST_SIDES = {"R": CodedConcept("73056007", "SCT", "Right breast"),
                "L": CodedConcept("80248007", "SCT", "Left breast")}
MAMMOGRAPHY_VIEWS = {
    "CC": CodedConcept("399162004", "SCT", "cranio-caudal"),
    "MLO": CodedConcept("399368009", "SCT", "medio-lateral oblique"),
    "ML": CodedConcept("399260004", "SCT", "medio-lateral"),
    "LM": CodedConcept("399352003", "SCT", "latero-medial"),
    "LMO": CodedConcept("399099002", "SCT", "latero-medial oblique"),
    "XCCL": CodedConcept("399192008", "SCT", "cranio-caudal exaggerated laterally"),
    "XCCM": CodedConcept("399101009", "SCT", "cranio-caudal exaggerated medially"),
    "FB": CodedConcept("399196006", "SCT", "caudo-cranial (from below)"),
    "SIO": CodedConcept("399188001", "SCT", "superolateral to inferomedial oblique"),
    "ISO": CodedConcept("441555000", "SCT", "inferomedial to superolateral oblique"),
}

# Root positions (1-based, PS3.3 C.17.3.2.5) of the items the by-reference items point at.
IMAGE_LIBRARY_POSITION = (1, 2)  # root, then Image Library (after the language item)

SCORE_MEANING = ("Scores are the model's likelihood of an abnormality needing work-up (benign "
                 "or malignant), not a probability of cancer, and are not calibrated to a "
                 "screening population.")


def _text(name: CodedConcept, value: str, relation: Relation) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024], relationship_type=relation)


def _code(name: CodedConcept, value: CodedConcept, relation: Relation) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=relation)


def _num(name: CodedConcept, value: float, unit: CodedConcept, relation: Relation
         ) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type=relation)


def _by_reference(relation: Relation, position: Sequence[int]) -> Dataset:
    """A by-reference relationship to the content item at `position` (PS3.3 C.17.3.2.5)."""
    item = Dataset()
    item.RelationshipType = relation.value
    item.ReferencedContentItemIdentifier = [int(p) for p in position]
    return item


def _with_children(item: Dataset, children: Sequence[Dataset]) -> Dataset:
    """`item`'s elements as a plain pydicom item (sharing them), with these children:
    highdicom's content items only take highdicom children, and TID 4000 needs by-reference
    items and a name-less IMAGE."""
    plain = Dataset(item)
    plain.ContentSequence = DicomSequence(list(children))
    return plain


def _algorithm(model: ModelIdentity, relation: Relation) -> list[Dataset]:
    """TID 4019: the algorithm's name, version and the operating point it ran at."""
    parameters = [f"operating_point={model.operating_point:g}",
                  f"operating_point_name={model.operating_point_name}",
                  "finding=heatmap region at or above the operating point"]
    return [_text(ALGORITHM_NAME, model.name, relation),
            _text(ALGORITHM_VERSION, model.version, relation),
            *[_text(ALGORITHM_PARAMETERS, p, relation) for p in parameters]]


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: Pixel Spacing, else Imager Pixel Spacing (MG)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    return None


def _library_entry(source: Dataset, view: ViewScore) -> Dataset:
    """TID 4020: the IMAGE (no concept name) and what a workstation needs to hang it."""
    image = Dataset()
    image.RelationshipType = Relation.CONTAINS.value
    image.ValueType = "IMAGE"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    image.ReferencedSOPSequence = DicomSequence([reference])
    acquisition = Relation.HAS_ACQ_CONTEXT
    context: list[Dataset] = []
    if view.laterality in BREAST_SIDES:
        context.append(_code(IMAGE_LATERALITY, BREAST_SIDES[view.laterality], acquisition))
    if view.view in MAMMOGRAPHY_VIEWS:
        context.append(_code(IMAGE_VIEW, MAMMOGRAPHY_VIEWS[view.view], acquisition))
    orientation = list(source.get("PatientOrientation") or [])
    if len(orientation) == 2 and all(str(o).strip() for o in orientation):
        context.append(_text(PATIENT_ORIENTATION_ROW, str(orientation[0]), acquisition))
        context.append(_text(PATIENT_ORIENTATION_COLUMN, str(orientation[1]), acquisition))
    for keyword, name, item_class in (
        ("StudyDate", STUDY_DATE, hd.sr.DateContentItem),
        ("StudyTime", STUDY_TIME, hd.sr.TimeContentItem),
        ("ContentDate", CONTENT_DATE, hd.sr.DateContentItem),
        ("ContentTime", CONTENT_TIME, hd.sr.TimeContentItem),
    ):
        value = source.get(keyword)
        if value:
            context.append(item_class(name=name, value=value, relationship_type=acquisition))
    spacing = _pixel_spacing(source)
    if spacing is not None:
        context.append(_num(HORIZONTAL_PIXEL_SPACING, spacing[1], MILLIMETRE, acquisition))
        context.append(_num(VERTICAL_PIXEL_SPACING, spacing[0], MILLIMETRE, acquisition))
    context.append(_num(PIXEL_DATA_ROWS, int(source.Rows), PIXELS, acquisition))
    context.append(_num(PIXEL_DATA_COLUMNS, int(source.Columns), PIXELS, acquisition))
    return _with_children(image, context)


def _region(name: CodedConcept, graphic_type: str, points: npt.NDArray[np.float64],
            image_position: Sequence[int]) -> Dataset:
    """TID 4021: a SCOORD on the source image, SELECTED FROM its Image Library entry."""
    scoord = hd.sr.ScoordContentItem(name=name, graphic_type=graphic_type, graphic_data=points,
                                     relationship_type=Relation.HAS_PROPERTIES)
    return _with_children(scoord, [_by_reference(Relation.SELECTED_FROM, image_position)])


def _single_image_finding(finding: Finding, view: ViewScore, model: ModelIdentity,
                          image_position: Sequence[int]) -> Dataset:
    """TID 4006 for one heatmap region (see the module docstring for the codes chosen)."""
    finding_item = _code(SINGLE_IMAGE_FINDING, SELECTED_REGION, Relation.CONTAINS)
    properties = Relation.HAS_PROPERTIES
    intent = _code(RENDERING_INTENT, PRESENTATION_REQUIRED, Relation.HAS_CONCEPT_MOD)
    description = (f"Region of the {view.view_key} view where the model's lesion heatmap "
                   f"reaches {finding.score:.3f}, at or above its {model.operating_point_name} "
                   f"operating point {model.operating_point:g}: a suspected abnormality "
                   f"(benign or malignant, type not determined). {RESEARCH_USE_LABEL}.")
    centre = np.array([finding.peak], dtype=np.float64)
    outline = np.array(finding.ellipse(), dtype=np.float64)
    children = [
        intent,
        *_algorithm(model, properties),
        _num(CERTAINTY_OF_FINDING, round(100.0 * min(max(finding.score, 0.0), 1.0), 2),
             PERCENT, properties),
        _region(CENTER, "POINT", centre, image_position),
        _region(OUTLINE, "ELLIPSE", outline, image_position),
        _text(SELECTED_REGION_DESCRIPTION, description, properties),
    ]
    return _with_children(finding_item, children)


def _overall_description(result: StudyResult, model: ModelIdentity, findings: int,
                         outside_domain: Mapping[str, Sequence[str]] | None = None,
                         replaces: int = 0) -> str:
    verdict = "suspicious" if result.exam_score >= model.operating_point else "not suspicious"
    breasts = ", ".join(f"{'right' if side == 'R' else 'left'} breast {score:.3f}"
                        for side, score in sorted(result.breast_scores.items(), reverse=True))
    missing = (f" Views not available: {', '.join(result.missing_views)}."
               if result.missing_views else "")
    domain = "".join(f" {text}." for text in domain_texts(result, outside_domain or {}))
    return (f"{RESEARCH_USE_LABEL}. AI abnormality score for the exam {result.exam_score:.3f} "
            f"({verdict} at the {model.operating_point_name} operating point "
            f"{model.operating_point:g}); {breasts}. {findings} region(s) marked.{missing} "
            f"{SCORE_MEANING}{domain}" + (f" {replaces_text(replaces)}." if replaces else ""))


def _detections_summary(model: ModelIdentity, image_positions: Sequence[Sequence[int]]
                        ) -> Dataset:
    """Summary of Detections: Succeeded, inferred from the one detection performed (TID 4017)."""
    properties = Relation.HAS_PROPERTIES
    detection = _with_children(
        _code(DETECTION_PERFORMED, SELECTED_REGION, Relation.CONTAINS),
        [*_algorithm(model, properties),
         *[_by_reference(properties, position) for position in image_positions],
         _num(MAXIMUM_OPERATING_POINT, 0, ARBITRARY_UNIT, properties),
         _num(RECOMMENDED_OPERATING_POINT, 0, OPERATING_POINT_UNIT, properties)])
    successful = _with_children(
        hd.sr.ContainerContentItem(name=SUCCESSFUL_DETECTIONS,
                                   relationship_type=Relation.INFERRED_FROM),
        [detection])
    return _with_children(_code(SUMMARY_OF_DETECTIONS, SUCCEEDED, Relation.CONTAINS),
                          [successful])


def build_cad_sr(
    sources: Sequence[Dataset],
    result: StudyResult,
    findings: Sequence[Sequence[Finding]],
    model: ModelIdentity,
    output: OutputSpec,
    outside_domain: Mapping[str, Sequence[str]] | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> Dataset:
    """The Mammography CAD SR of one run; `findings` of each scored view, in view order (from
    `pipelines.findings.find_findings` at the model's operating point, as for every object);
    `outside_domain` (source SOP Instance UID -> outside_domain reasons) adds a sentence per such
    view to the overall impression; `previous_versions` (headers of our earlier CAD SRs of the
    study, from the runs this one supersedes) are its predecessor documents, said there too.

    UIDs derive from the study, the source images, the model and its operating point (as for
    the TID 1500 SR), so a run scored again sends the same object.
    """
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    unknown = sorted(v.sop_uid for v in result.views if v.sop_uid not in by_uid)
    if not result.views or unknown:
        raise ValueError(f"result.views: none, or scores for images not among the sources: "
                         f"{unknown}")
    foreign = sorted(uid for uid, s in by_uid.items() if s.StudyInstanceUID != result.study_uid)
    if foreign:
        raise ValueError(f"sources: not in study {result.study_uid}: {foreign}")
    uid_parts = ("cad-sr", result.study_uid, model.name, model.version,
                 f"{model.operating_point:.6g}", *sorted(v.sop_uid for v in result.views))

    own_uid = derive_uid(output.uid_root, *uid_parts, "instance")
    previous = [p for p in previous_versions if str(p.SOPInstanceUID) != own_uid]
    library = [_library_entry(by_uid[view.sop_uid], view) for view in result.views]
    image_positions = {view.sop_uid: (*IMAGE_LIBRARY_POSITION, index + 1)
                       for index, view in enumerate(result.views)}
    if len(findings) != len(result.views):
        raise ValueError(f"findings: {len(findings)} lists for {len(result.views)} scored views")
    marked = [(view, finding) for view, of_view in zip(result.views, findings, strict=True)
              for finding in of_view]
    impressions = []
    for view, finding in marked:
        impression = hd.sr.ContainerContentItem(name=INDIVIDUAL_IMPRESSION,
                                                relationship_type=Relation.INFERRED_FROM)
        impressions.append(_with_children(impression, [
            _code(RENDERING_INTENT, PRESENTATION_REQUIRED, Relation.HAS_CONCEPT_MOD),
            _single_image_finding(finding, view, model, image_positions[view.sop_uid]),
        ]))
    summary = _with_children(
        _code(CAD_SUMMARY, SUCCEEDED_WITH_FINDINGS if marked else SUCCEEDED_WITHOUT_FINDINGS,
              Relation.CONTAINS),
        [_text(IMPRESSION_DESCRIPTION, _overall_description(result, model, len(marked),
                                                            outside_domain, len(previous)),
               Relation.HAS_PROPERTIES),
         *_algorithm(model, Relation.HAS_PROPERTIES),
         *impressions])
    root = _with_children(
        hd.sr.ContainerContentItem(name=MAMMOGRAPHY_CAD_REPORT, template_id="4000"),
        [_code(LANGUAGE, ENGLISH_US, Relation.HAS_CONCEPT_MOD),
         _with_children(hd.sr.ContainerContentItem(name=IMAGE_LIBRARY,
                                                   relationship_type=Relation.CONTAINS),
                        library),
         summary,
         _detections_summary(model, list(image_positions.values())),
         _code(SUMMARY_OF_ANALYSES, NOT_ATTEMPTED, Relation.CONTAINS)])
    # highdicom's SR base re-reads its content through its own item classes, which know no
    # by-reference items: give it the bare root, then attach the tree. It records every source
    # of the study as evidence either way (highdicom.sr.utils.collect_evidence).
    document = MammographyCADSR(
        evidence=[highdicom_safe(by_uid[v.sop_uid]) for v in result.views],
        content=_with_children(
            hd.sr.ContainerContentItem(name=MAMMOGRAPHY_CAD_REPORT, template_id="4000"),
            root.ContentSequence[:1]),
        series_instance_uid=derive_uid(output.uid_root, *uid_parts, "series"),
        series_number=output.series_number,
        sop_instance_uid=own_uid,
        instance_number=1,
        manufacturer=output.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous or None,
        series_description=series_description(output.series_description),
        software_versions=output.software_version,
    )
    document.ContentSequence = root.ContentSequence
    carry_source_values(by_uid[result.views[0].sop_uid], document)  # every value, as received
    # Beside whatever highdicom lists, the node and the model (pipelines/attribution.py); set
    # through pydicom, as highdicom types the attribute as its own equipment class.
    equipment = [*document.get("ContributingEquipmentSequence", []),
                 *contributing_equipment(model)]
    Dataset.__setattr__(document, "ContributingEquipmentSequence", DicomSequence(equipment))
    return document


class MammographyCADSR(_SR):
    """highdicom's SR document base with the Mammography CAD SR SOP class (highdicom has public
    classes only for the other SR IODs; theirs are this same one-line wrapper)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(sop_class_uid=str(MAMMOGRAPHY_CAD_SR), **kwargs)  # type: ignore[arg-type]


__all__ = ["MammographyCADSR", "build_cad_sr"]

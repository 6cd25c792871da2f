"""What every object the node writes says about itself: research use only, and who made it.

One place for the label and the Contributing Equipment item, so the SR, the CAD SR, the SEGs and
the Secondary Capture overlay say the same thing (PS3.3 C.12.1: Contributing Equipment Sequence,
purpose "Processing Equipment"), and for the sentences the two SRs give each view outside the
model's declared domain.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq

from pydicom import Dataset
from pydicom.sequence import Sequence

from node.version import software_version
from pipelines.results import ModelIdentity, StudyResult

RESEARCH_USE_LABEL = "Research use only, not for diagnosis"
MANUFACTURER = "mammo-node"
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")


def contributing_equipment(identity: ModelIdentity) -> Sequence:
    """A Contributing Equipment Sequence naming the node's software and the model that scored."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_EQUIPMENT
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = identity.name[:64]
    item.SoftwareVersions = [software_version()[:64], f"model {identity.version}"[:64]]
    item.ContributionDescription = f"AI scoring by model {identity.name} {identity.version}. " \
                                   f"{RESEARCH_USE_LABEL}."[:1024]
    return Sequence([item])


def series_description(description: str) -> str:
    """A series description that says research use only (LO: at most 64 characters)."""
    suffix = " - research use only"
    if "research use only" in description.lower():
        return description[:64]
    return (description[: 64 - len(suffix)] + suffix)[:64]


# `pipelines/quality.py` outside_domain reasons, as a reader would say them
DOMAIN_REASONS = {
    "modality": "modality", "pixel_spacing": "pixel size",
    "pixel_spacing_missing": "no pixel size in the header", "view": "view",
    "photometric": "photometric interpretation", "presentation_intent": "For Processing image",
}


def domain_texts(result: StudyResult, outside_domain: Mapping[str, Seq[str]]) -> list[str]:
    """One sentence per scored view outside the model's declared domain, so the reader of the
    report knows which scores come from images the model was not trained on."""
    texts = []
    for view in result.views:
        reasons = outside_domain.get(view.sop_uid)
        if reasons:
            said = ", ".join(DOMAIN_REASONS.get(r, r) for r in reasons)
            texts.append(f"{view.view_key}: outside the model's declared domain ({said}); its "
                         "score was not validated on such images")
    return texts

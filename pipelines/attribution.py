"""What every object the node writes says about itself: research use only, and who made it.

One place for the label and the Contributing Equipment item, so the SR, the CAD SR, the SEGs and
the Secondary Capture overlay say the same thing (PS3.3 C.12.1: Contributing Equipment Sequence,
purpose "Processing Equipment").
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.sequence import Sequence

from node.version import software_version
from pipelines.results import ModelIdentity

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

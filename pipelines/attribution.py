"""What every object the node writes says about itself: research use only, and who made it.

One place for the label and the Contributing Equipment item, so the SR, the CAD SR, the SEGs and
the Secondary Capture overlay say the same thing (PS3.3 C.12.1: Contributing Equipment Sequence,
purpose "Processing Equipment"), and for what they say of a view outside the model's declared
domain: a sentence in both SRs, "outside domain" in its SEGs' series description, a burned-in
line on its overlay.
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
OUTSIDE_DOMAIN = "outside domain"  # in a series description: see series_description


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


def series_description(description: str, view_key: str | None = None,
                       outside_domain: bool = False) -> str:
    """A series description that says research use only (LO: at most 64 characters).

    A series of one view's objects (the SEGs) starts with the view, and with "outside domain"
    when that image is outside the model's declared domain ("L-CC outside domain: AI suspicious
    regions - research use only"): the series list is what every viewer shows, OHIF included,
    and OHIF's cuts a description after about 23 characters. The configured text is what gets
    shortened (at a word) to fit, never the view, the caveat or the label.
    """
    suffix = "" if "research use only" in description.lower() else " - research use only"
    head = f"{view_key}{' ' + OUTSIDE_DOMAIN if outside_domain else ''}: " if view_key else ""
    room = 64 - len(head) - len(suffix)
    if len(description) > room:
        description = description[:room + 1].rsplit(" ", 1)[0][:room]
    return (head + description.rstrip() + suffix)[:64]


# `pipelines/quality.py` outside_domain reasons, as a reader would say them
DOMAIN_REASONS = {
    "modality": "modality", "pixel_spacing": "pixel size",
    "pixel_spacing_missing": "no pixel size in the header", "view": "view",
    "photometric": "photometric interpretation", "presentation_intent": "For Processing image",
}


def domain_caveat(view_key: str, reasons: Seq[str]) -> str:
    """"L-CC: outside the model's declared domain (pixel size, view)"."""
    said = ", ".join(DOMAIN_REASONS.get(r, r) for r in reasons)
    return f"{view_key}: outside the model's declared domain ({said})"


def replaces_text(count: int) -> str:
    """The sentence of a report that replaces `count` earlier reports of its study (a later run,
    on more images or by another model, listed in its Predecessor Documents Sequence): the
    archive keeps the earlier ones, and the reader must know which one is current."""
    earlier = "an earlier report" if count == 1 else f"{count} earlier reports"
    return (f"This report replaces {earlier} of this study from this node, made on fewer of its "
            "images, or by another model or operating point (listed as predecessor documents): "
            "read this one")


def domain_texts(result: StudyResult, outside_domain: Mapping[str, Seq[str]]) -> list[str]:
    """One sentence per scored view outside the model's declared domain, so the reader of the
    report knows which scores come from images the model was not trained on, and one per view
    left unscored for it (`StudyResult.not_scored`)."""
    return [*(f"{domain_caveat(view.view_key, outside_domain[view.sop_uid])}; its score was not "
              "validated on such images"
              for view in result.views if outside_domain.get(view.sop_uid)),
            *(f"{domain_caveat(view_key, reasons)}; not scored"
              for view_key, reasons in result.not_scored)]

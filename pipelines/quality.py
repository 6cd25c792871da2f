"""Input-quality flags per image: what makes a score less trustworthy, recorded and counted.

Computed where the data already is, never with a second read or decode: the manifest entry's
flags for every instance of a run (`entry_flags`), the header's and the pixels' for the images
the worker decodes (`image_flags`, called by pipelines/study.py:decode_view). The flags go into
the run record (`inputs[].quality_flags`) and the counter `mammo_input_quality_flags_total`.

| flag | when |
|---|---|
| `view_missing` | no ViewPosition (the image cannot be placed among the screening views) |
| `laterality_missing` | no ImageLaterality / Laterality |
| `for_processing` | a For Processing image (raw detector data; trained on presentation images) |
| `implant_present` | BreastImplantPresent is YES, or a view modifier says implant displaced |
| `wrong_body_part` | BodyPartExamined is given and is not BREAST |
| `low_contrast` | the 1st-99th percentile range inside the breast is below |
|  | `quality.low_contrast_fraction` of the range BitsStored allows |
| `outside_domain:<reason>` | outside the bundle's declared `domain` (`domain_flags`, from the |
|  | header, by pipelines/scoring.py): `modality`, `pixel_spacing`, `pixel_spacing_missing`, |
|  | `view`, `photometric`, `presentation_intent` |
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.runs import InstanceEntry
from node.vocabulary import MG_FOR_PROCESSING

QUALITY_FLAGS = ("view_missing", "laterality_missing", "for_processing", "implant_present",
                 "wrong_body_part", "low_contrast")
DEFAULT_LOW_CONTRAST_FRACTION = 0.01
_IMPLANT_DISPLACED = {
    (str(codes.SCT.ImplantDisplaced.value), "SCT"),
    ("R-102D2", "SRT"),  # the same concept in the retired SNOMED-RT codes older modalities send
}
_SAMPLE_PIXELS = 512 * 512  # contrast is measured on a regular subsample of about this size
DOMAIN_KEY = "domain"  # in a bundle's metadata.json
OUTSIDE_DOMAIN = "outside_domain:"


def entry_flags(entry: InstanceEntry) -> tuple[str, ...]:
    """What the manifest says about an instance (every instance of a run, decoded or not)."""
    flags = []
    if not entry.view:
        flags.append("view_missing")
    if not entry.laterality:
        flags.append("laterality_missing")
    if entry.sop_class_uid == MG_FOR_PROCESSING:
        flags.append("for_processing")
    return tuple(flags)


def implant_present(header: Dataset) -> bool:
    if str(header.get("BreastImplantPresent", "") or "").strip().upper() == "YES":
        return True
    for view in header.get("ViewCodeSequence", None) or ():
        for modifier in view.get("ViewModifierCodeSequence", None) or ():
            code = (str(modifier.get("CodeValue", "")), str(modifier.get("CodingSchemeDesignator", "")))
            if code in _IMPLANT_DISPLACED:
                return True
    return False


def wrong_body_part(header: Dataset) -> bool:
    part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    return bool(part) and part != "BREAST"


def contrast_fraction(pixels: npt.NDArray[np.number[Any]], bits_stored: int) -> float:
    """The 1st-99th percentile range of the pixels inside the breast, as a fraction of the range
    `bits_stored` allows. The breast is what lies above the background: brighter than a tenth of
    the way from the 0.5th to the 99.5th percentile of the image (MONOCHROME2 sense)."""
    rows, cols = pixels.shape[:2]
    step = max(1, int(np.sqrt(rows * cols / _SAMPLE_PIXELS)))
    sample = np.asarray(pixels[::step, ::step], dtype=np.float64).ravel()
    if sample.size == 0:
        return 0.0
    low, high = np.percentile(sample, [0.5, 99.5])
    if high <= low:
        return 0.0
    inside = sample[sample > low + 0.1 * (high - low)]
    if inside.size < 100:
        inside = sample
    p1, p99 = np.percentile(inside, [1, 99])
    return float((p99 - p1) / float(2 ** max(1, bits_stored) - 1))


def image_flags(header: Dataset, pixels: npt.NDArray[np.number[Any]],
                low_contrast_fraction: float = DEFAULT_LOW_CONTRAST_FRACTION) -> tuple[str, ...]:
    """What the header and the decoded pixels say (MONOCHROME2 sense, any orientation)."""
    flags = []
    if implant_present(header):
        flags.append("implant_present")
    if wrong_body_part(header):
        flags.append("wrong_body_part")
    bits = int(header.get("BitsStored", 16) or 16)
    if contrast_fraction(pixels, bits) < low_contrast_fraction:
        flags.append("low_contrast")
    return tuple(flags)


def merge_flags(*groups: Iterable[str]) -> tuple[str, ...]:
    """The flags of several sources, once each, in QUALITY_FLAGS order, then the
    `outside_domain:` ones sorted."""
    present = {flag for group in groups for flag in group}
    return (tuple(flag for flag in QUALITY_FLAGS if flag in present)
            + tuple(sorted(f for f in present if f.startswith(OUTSIDE_DOMAIN))))


@dataclass(frozen=True)
class Domain:
    """What a bundle declares it was trained for (metadata.json `domain`); an empty tuple or
    None means that property is not restricted."""

    modalities: tuple[str, ...] = ()
    pixel_spacing_mm: tuple[float, float] | None = None
    views: tuple[str, ...] = ()
    photometric_interpretations: tuple[str, ...] = ()
    presentation_intents: tuple[str, ...] = ()

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> Domain | None:
        """None for a bundle that declares no domain (or a malformed one: nothing is flagged)."""
        raw = metadata.get(DOMAIN_KEY) if isinstance(metadata, Mapping) else None
        if not isinstance(raw, Mapping):
            return None

        def upper(key: str) -> tuple[str, ...]:
            return tuple(str(v).strip().upper() for v in raw.get(key) or ())

        spacing = raw.get("pixel_spacing_mm")
        try:
            low, high = (float(v) for v in spacing) if spacing else (0.0, 0.0)
        except (TypeError, ValueError):
            return None
        return cls(upper("modalities"), (low, high) if spacing else None, upper("views"),
                   upper("photometric_interpretations"), upper("presentation_intents"))


def pixel_spacing_of(header: Dataset) -> float | None:
    """The mean pixel spacing in mm: PixelSpacing (at the breast), else ImagerPixelSpacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword, None)
        try:
            spacing = [float(v) for v in value] if value else []
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            return (spacing[0] + spacing[1]) / 2
    return None


def domain_flags(header: Dataset, domain: Domain | None) -> tuple[str, ...]:
    """`outside_domain:<reason>` for each way the image lies outside the bundle's domain."""
    if domain is None:
        return ()
    reasons = []

    def value(keyword: str) -> str:
        return str(header.get(keyword, "") or "").strip().upper()

    if domain.modalities and value("Modality") not in domain.modalities:
        reasons.append("modality")
    if domain.pixel_spacing_mm is not None:
        spacing = pixel_spacing_of(header)
        low, high = domain.pixel_spacing_mm
        if spacing is None:
            reasons.append("pixel_spacing_missing")
        elif not low <= spacing <= high:
            reasons.append("pixel_spacing")
    if domain.views and value("ViewPosition") not in domain.views:
        reasons.append("view")
    if (domain.photometric_interpretations
            and value("PhotometricInterpretation") not in domain.photometric_interpretations):
        reasons.append("photometric")
    intent = value("PresentationIntentType")
    if domain.presentation_intents and intent and intent not in domain.presentation_intents:
        reasons.append("presentation_intent")
    return tuple(OUTSIDE_DOMAIN + reason for reason in reasons)


def domain_reasons(flags: Iterable[str]) -> tuple[str, ...]:
    """The reasons of `outside_domain:` flags: ("pixel_spacing", "view")."""
    return tuple(f.removeprefix(OUTSIDE_DOMAIN) for f in flags)


def outside_reason(flags: Iterable[str]) -> str:
    """A view's `outside_domain:` flags as one skip reason (`scoring.outside_domain: skip`):
    `outside_domain:pixel_spacing,view`."""
    return OUTSIDE_DOMAIN + ",".join(domain_reasons(flags))

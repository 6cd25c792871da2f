"""The DICOM vocabulary the node speaks: SOP classes, transfer syntaxes, C-STORE statuses and
A-ASSOCIATE-RJ reasons, built from pynetdicom and pydicom instead of typed-in UIDs.

This is the one place these values are named; the listener, the sender, the receive-time checks
and the pipelines import them from here. What pynetdicom also tabulates (statuses, reject reason
texts) is checked against its tables when this module is imported, so a library that disagrees
with us stops the node at start-up instead of answering peers with a code it describes otherwise.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple, cast

from pydicom import uid
from pydicom.uid import UID
from pynetdicom import sop_class as _sop_classes
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import SOPClass
from pynetdicom.status import (
    GENERAL_STATUS,
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
)


def _sop_class(name: str) -> SOPClass:
    """pynetdicom's SOP class by keyword (its module builds them at import, invisible to mypy);
    an unknown keyword raises AttributeError at import."""
    return cast(SOPClass, getattr(_sop_classes, name))


# --- SOP classes ---------------------------------------------------------------------------------
VERIFICATION = _sop_class("Verification")
MG_FOR_PRESENTATION = _sop_class("DigitalMammographyXRayImageStorageForPresentation")
MG_FOR_PROCESSING = _sop_class("DigitalMammographyXRayImageStorageForProcessing")
BREAST_TOMOSYNTHESIS = _sop_class("BreastTomosynthesisImageStorage")
COMPREHENSIVE_3D_SR = _sop_class("Comprehensive3DSRStorage")  # our results (pipelines/sr.py)
SEGMENTATION = _sop_class("SegmentationStorage")  # our heatmaps (pipelines/seg.py)
MAMMOGRAPHY_CAD_SR = _sop_class("MammographyCADSRStorage")  # TID 4000 (pipelines/cad_sr.py)

# What the listener stores, and of that what the model scores (tomosynthesis is kept, not scored).
STORAGE_SOP_CLASSES: tuple[SOPClass, ...] = (MG_FOR_PRESENTATION, MG_FOR_PROCESSING,
                                             BREAST_TOMOSYNTHESIS)
SCORABLE_SOP_CLASSES: tuple[SOPClass, ...] = (MG_FOR_PRESENTATION, MG_FOR_PROCESSING)



def storage_sop_classes_named(names: tuple[str, ...] | None) -> tuple[SOPClass, ...]:
    """The storage SOP classes a config names (pynetdicom keyword or UID; None: all of them);
    ValueError naming what is not one the node stores."""
    if names is None:
        return STORAGE_SOP_CLASSES
    by_name = {n: sop for sop in STORAGE_SOP_CLASSES for n in (str(sop), sop.keyword)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"not storage SOP classes the node takes: {unknown} (known: "
                         f"{[sop.keyword for sop in STORAGE_SOP_CLASSES]})")
    return tuple(dict.fromkeys(by_name[n] for n in names))


# --- transfer syntaxes ---------------------------------------------------------------------------
IMPLICIT_VR_LITTLE_ENDIAN = uid.ImplicitVRLittleEndian
EXPLICIT_VR_LITTLE_ENDIAN = uid.ExplicitVRLittleEndian
NATIVE_TRANSFER_SYNTAXES: tuple[UID, ...] = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN)
JPEG2000_TRANSFER_SYNTAXES: tuple[UID, ...] = (uid.JPEG2000Lossless, uid.JPEG2000)
JPEG_LS_TRANSFER_SYNTAXES: tuple[UID, ...] = (uid.JPEGLSLossless, uid.JPEGLSNearLossless)
RLE_LOSSLESS = uid.RLELossless
# What the listener accepts, listed explicitly: never Deflated (inflate bombs) nor Big Endian
# (retired).
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    *NATIVE_TRANSFER_SYNTAXES,
    *JPEG2000_TRANSFER_SYNTAXES,
    *JPEG_LS_TRANSFER_SYNTAXES,
    uid.JPEGLossless,  # Process 14
    uid.JPEGLosslessSV1,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    RLE_LOSSLESS,
)
# The SEG's pixel data (pipelines/seg.py).
SEGMENTATION_TRANSFER_SYNTAX = uid.JPEG2000Lossless


# --- C-STORE statuses (PS3.4 B.2.3) --------------------------------------------------------------
class StoreStatus(IntEnum):
    """The C-STORE statuses the listener answers (checked against pynetdicom at import)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    INVALID_UID = 0xC001  # a "cannot understand" code: the UIDs are what cannot be understood

    @property
    def hex(self) -> str:
        """As logs and the audit trail print it: 0xA700."""
        return f"0x{int(self):04X}"


# The (category, description) each status must have in pynetdicom's storage status table.
STORE_STATUS_MEANINGS: dict[StoreStatus, tuple[str, str]] = {
    StoreStatus.SUCCESS: (STATUS_SUCCESS, ""),
    StoreStatus.OUT_OF_RESOURCES: (STATUS_FAILURE, "Refused: Out of Resources"),
    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS: (STATUS_FAILURE,
                                                   "Data Set Does Not Match SOP Class"),
    StoreStatus.CANNOT_UNDERSTAND: (STATUS_FAILURE, "Cannot Understand"),
    StoreStatus.INVALID_UID: (STATUS_FAILURE, "Cannot Understand"),
}

# A C-STORE of a SOP class the called AE title's pipeline does not take (on a context negotiated
# for another class): PS3.7 C.4.2.1.4 "Refused: SOP Class not supported", a general status.
SOP_CLASS_NOT_SUPPORTED = 0x0122
SOP_CLASS_NOT_SUPPORTED_MEANING = (STATUS_FAILURE, "Refused: SOP Class Not Supported")

# Warnings (0xB000-0xBFFF): the object was stored, possibly altered (e.g. coerced elements).
STORE_WARNING_RANGE = range(0xB000, 0xBFFF + 1)


def is_stored(status: int | None) -> bool:
    """Whether a C-STORE response status means the destination kept the object."""
    return status is not None and (status == StoreStatus.SUCCESS or status in STORE_WARNING_RANGE)


def store_status_meaning(status: int) -> str:
    """A C-STORE response status as PS3.4 B.2.3 and PS3.7 C.4 name it ("Refused: Out of
    Resources"), or "" for a code neither defines."""
    _, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status) or ("", "")
    return str(meaning)


def is_final_store_failure(status: int | None) -> bool:
    """Whether a C-STORE failure is about the object itself, so the destination will answer the
    same to the same bytes: 0xA900-0xA9FF (data set does not match the SOP class), 0xC000-0xCFFF
    (cannot understand), 0x0122 (SOP class not supported). Out of resources (0xA7xx), a
    processing failure (0x0110) and the rest may pass on another attempt."""
    return status is not None and (0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF
                                   or status == SOP_CLASS_NOT_SUPPORTED)


# --- A-ASSOCIATE-RJ (PS3.8 9.3.4) ----------------------------------------------------------------
class RejectResult(IntEnum):
    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class AssociateRejection(NamedTuple):
    """One A-ASSOCIATE-RJ: result, source and the reason/diagnostic (whose meaning depends on the
    source)."""

    result: RejectResult
    source: RejectSource
    reason: int

    def audit_fields(self) -> dict[str, str]:
        """As the audit trail records a rejection: two hex digits each."""
        return {"result": f"0x{self.result:02X}", "source": f"0x{self.source:02X}",
                "diagnostic": f"0x{self.reason:02X}"}


REJECT_CALLING_AE_NOT_RECOGNISED = AssociateRejection(RejectResult.PERMANENT,
                                                      RejectSource.SERVICE_USER, 0x03)
REJECT_CALLED_AE_NOT_RECOGNISED = AssociateRejection(RejectResult.PERMANENT,
                                                     RejectSource.SERVICE_USER, 0x07)
# Rejected-permanent, service-user, no-reason-given: a request we will never accept as it stands
# (more presentation contexts than node.max_presentation_contexts).
REJECT_NO_REASON_GIVEN = AssociateRejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 0x01)
# Rejected-transient, service-provider (presentation), local-limit-exceeded: "try again later".
REJECT_LOCAL_LIMIT_EXCEEDED = AssociateRejection(RejectResult.TRANSIENT,
                                                 RejectSource.SERVICE_PROVIDER_PRESENTATION, 0x02)

# The text pynetdicom gives each rejection we send (its reason table, keyed by source).
REJECTION_MEANINGS: dict[AssociateRejection, str] = {
    REJECT_CALLING_AE_NOT_RECOGNISED: "Calling AE title not recognised",
    REJECT_CALLED_AE_NOT_RECOGNISED: "Called AE title not recognised",
    REJECT_LOCAL_LIMIT_EXCEEDED: "Local limit exceeded",
    REJECT_NO_REASON_GIVEN: "No reason given",
}


class VocabularyMismatch(RuntimeError):
    """pynetdicom describes one of our codes differently from what we mean by it."""


def check_against_pynetdicom() -> None:
    """Every status and reject reason we send means in pynetdicom what we mean by it."""
    for status, meaning in STORE_STATUS_MEANINGS.items():
        theirs = STORAGE_SERVICE_CLASS_STATUS.get(int(status))
        if theirs != meaning:
            raise VocabularyMismatch(f"C-STORE status {status.hex} ({status.name}): pynetdicom "
                                     f"says {theirs}, we mean {meaning}")
    theirs = STORAGE_SERVICE_CLASS_STATUS.get(SOP_CLASS_NOT_SUPPORTED)
    if theirs != SOP_CLASS_NOT_SUPPORTED_MEANING:
        raise VocabularyMismatch(f"C-STORE status 0x0122: pynetdicom says {theirs}, we mean "
                                 f"{SOP_CLASS_NOT_SUPPORTED_MEANING}")
    warnings = {code for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
                if category == STATUS_WARNING and code >= 0x1000}
    if not warnings or not warnings <= set(STORE_WARNING_RANGE):
        raise VocabularyMismatch(f"pynetdicom's storage warnings {sorted(map(hex, warnings))} "
                                 "are not within 0xB000-0xBFFF")
    for rejection, text in REJECTION_MEANINGS.items():
        primitive = A_ASSOCIATE()
        primitive.result = int(rejection.result)
        primitive.result_source = int(rejection.source)
        primitive.diagnostic = rejection.reason
        if primitive.reason_str != text:
            raise VocabularyMismatch(f"A-ASSOCIATE-RJ {tuple(rejection)}: pynetdicom says "
                                     f"{primitive.reason_str!r}, we mean {text!r}")


check_against_pynetdicom()

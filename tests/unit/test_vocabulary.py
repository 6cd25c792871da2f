"""The DICOM vocabulary (node/vocabulary.py) is pynetdicom's and pydicom's, not our own typing."""

from __future__ import annotations

import pytest
from pydicom import uid
from pynetdicom import sop_class
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STORAGE_SERVICE_CLASS_STATUS

from node import vocabulary
from node.vocabulary import (
    ACCEPTED_TRANSFER_SYNTAXES,
    REJECT_CALLED_AE_NOT_RECOGNISED,
    REJECT_CALLING_AE_NOT_RECOGNISED,
    REJECT_LOCAL_LIMIT_EXCEEDED,
    STORAGE_SOP_CLASSES,
    AssociateRejection,
    RejectResult,
    RejectSource,
    StoreStatus,
    VocabularyMismatch,
    is_final_store_failure,
    is_stored,
    store_status_meaning,
)


def test_sop_classes_are_pynetdicoms() -> None:
    assert vocabulary.VERIFICATION == sop_class.Verification == "1.2.840.10008.1.1"
    assert vocabulary.MG_FOR_PRESENTATION == sop_class.DigitalMammographyXRayImageStorageForPresentation
    assert vocabulary.MG_FOR_PROCESSING == sop_class.DigitalMammographyXRayImageStorageForProcessing
    assert vocabulary.BREAST_TOMOSYNTHESIS == sop_class.BreastTomosynthesisImageStorage
    assert vocabulary.COMPREHENSIVE_3D_SR == sop_class.Comprehensive3DSRStorage
    assert vocabulary.SEGMENTATION == sop_class.SegmentationStorage == uid.SegmentationStorage
    assert STORAGE_SOP_CLASSES == (
        "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.13.1.3")
    assert vocabulary.SCORABLE_SOP_CLASSES == STORAGE_SOP_CLASSES[:2]  # tomosynthesis is not scored


def test_accepted_transfer_syntaxes_never_include_deflate_or_big_endian() -> None:
    assert uid.DeflatedExplicitVRLittleEndian not in ACCEPTED_TRANSFER_SYNTAXES
    assert uid.ExplicitVRBigEndian not in ACCEPTED_TRANSFER_SYNTAXES
    assert len(set(ACCEPTED_TRANSFER_SYNTAXES)) == len(ACCEPTED_TRANSFER_SYNTAXES) == 11
    assert all(syntax.is_transfer_syntax for syntax in ACCEPTED_TRANSFER_SYNTAXES)
    assert vocabulary.NATIVE_TRANSFER_SYNTAXES == ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    assert vocabulary.SEGMENTATION_TRANSFER_SYNTAX == uid.JPEG2000Lossless


def test_store_statuses_are_in_pynetdicoms_storage_table() -> None:
    assert StoreStatus.SUCCESS == 0x0000
    assert STORAGE_SERVICE_CLASS_STATUS[StoreStatus.SUCCESS][0] == STATUS_SUCCESS
    for status in (StoreStatus.OUT_OF_RESOURCES, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                   StoreStatus.CANNOT_UNDERSTAND, StoreStatus.INVALID_UID):
        assert STORAGE_SERVICE_CLASS_STATUS[status][0] == STATUS_FAILURE
    assert STORAGE_SERVICE_CLASS_STATUS[StoreStatus.OUT_OF_RESOURCES][1] == "Refused: Out of Resources"
    assert [int(s) for s in StoreStatus] == [0x0000, 0xA700, 0xA900, 0xC000, 0xC001]
    assert StoreStatus.OUT_OF_RESOURCES.hex == "0xA700"


def test_stored_means_success_or_a_storage_warning() -> None:
    assert is_stored(0x0000) and is_stored(0xB000) and is_stored(0xB007) and is_stored(0xBFFF)
    assert not is_stored(None) and not is_stored(0xA700) and not is_stored(0xC000)
    assert not is_stored(0x0107)  # a general warning is not a storage one


@pytest.mark.parametrize("rejection", [REJECT_CALLING_AE_NOT_RECOGNISED,
                                       REJECT_CALLED_AE_NOT_RECOGNISED,
                                       REJECT_LOCAL_LIMIT_EXCEEDED])
def test_reject_reasons_are_what_pynetdicom_decodes_them_as(rejection: AssociateRejection) -> None:
    pdu = A_ASSOCIATE_RJ()
    pdu.result, pdu.source, pdu.reason_diagnostic = rejection
    assert pdu.reason_str == vocabulary.REJECTION_MEANINGS[rejection]
    assert pdu.result_str == {RejectResult.PERMANENT: "Rejected (Permanent)",
                              RejectResult.TRANSIENT: "Rejected (Transient)"}[rejection.result]


def test_reject_triples_and_their_audit_form() -> None:
    assert REJECT_CALLING_AE_NOT_RECOGNISED == (0x01, 0x01, 0x03)
    assert REJECT_CALLED_AE_NOT_RECOGNISED == (0x01, 0x01, 0x07)
    assert REJECT_LOCAL_LIMIT_EXCEEDED == (0x02, 0x03, 0x02)
    assert REJECT_LOCAL_LIMIT_EXCEEDED.source is RejectSource.SERVICE_PROVIDER_PRESENTATION
    assert REJECT_LOCAL_LIMIT_EXCEEDED.audit_fields() == {
        "result": "0x02", "source": "0x03", "diagnostic": "0x02"}


def test_a_status_pynetdicom_describes_otherwise_fails_the_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    vocabulary.check_against_pynetdicom()  # as at import
    monkeypatch.setitem(vocabulary.STORE_STATUS_MEANINGS, StoreStatus.INVALID_UID,
                        (STATUS_FAILURE, "Invalid UID"))
    with pytest.raises(VocabularyMismatch, match="0xC001"):
        vocabulary.check_against_pynetdicom()


def test_a_reject_reason_pynetdicom_describes_otherwise_fails_the_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = AssociateRejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 0x02)
    monkeypatch.setitem(vocabulary.REJECTION_MEANINGS, wrong, "Calling AE title not recognised")
    with pytest.raises(VocabularyMismatch, match="Application context name not supported"):
        vocabulary.check_against_pynetdicom()


@pytest.mark.parametrize(("status", "final"), [
    (0xA900, True), (0xA9FF, True), (0xC000, True), (0xC001, True), (0xCFFF, True),
    (0x0122, True),  # SOP class not supported
    (0xA700, False), (0xA7FF, False), (0x0110, False), (0x0124, False), (0x0213, False),
    (0x0000, False), (0xB000, False), (None, False),
])
def test_only_failures_about_the_object_itself_are_final(status: int | None, final: bool) -> None:
    assert is_final_store_failure(status) is final


def test_a_store_status_is_named_as_the_standard_names_it() -> None:
    assert store_status_meaning(0xA700) == "Refused: Out of Resources"
    assert store_status_meaning(0xA900) == "Data Set Does Not Match SOP Class"
    assert store_status_meaning(0x0122) == "Refused: SOP Class Not Supported"
    assert store_status_meaning(0xFFFF) == ""

"""The pynetdicom internals module refuses a pynetdicom it was not written for, and names its
contract; the listener checks before it binds."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT

from node import pynetdicom_internals
from node.completion import AssociationTracker
from node.pynetdicom_internals import (
    CONTRACT_FAULT_TESTS,
    WRITTEN_FOR,
    PynetdicomVersionError,
    ReplyKeepingDIMSE,
    association_rejection,
    check_pynetdicom_version,
)
from node.scp import StoreSCP
from node.spool import Spool
from tests.support.settings import make_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_pynetdicom_is_the_one_it_was_written_for() -> None:
    assert pynetdicom.__version__ == WRITTEN_FOR == "3.0.4"
    check_pynetdicom_version()


def test_another_version_fails_loudly_naming_versions_and_fault_tests() -> None:
    with pytest.raises(PynetdicomVersionError) as raised:
        check_pynetdicom_version("3.1.0")
    message = str(raised.value)
    assert "3.1.0" in message and WRITTEN_FOR in message
    assert all(test in message for test in CONTRACT_FAULT_TESTS)


def test_the_contract_fault_tests_exist_and_are_in_the_docstring() -> None:
    assert CONTRACT_FAULT_TESTS
    for test in CONTRACT_FAULT_TESTS:
        assert (ROOT / test).is_file(), test
        assert test in (pynetdicom_internals.__doc__ or "")


def test_the_listener_does_not_start_on_another_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, listener=True)
    scp = StoreSCP(settings, Spool(settings.spool.dir).ensure(), AssociationTracker())
    monkeypatch.setattr(pynetdicom_internals.check_pynetdicom_version, "__defaults__", ("9.9.9",))
    with pytest.raises(PynetdicomVersionError, match="9.9.9"):
        scp.start()
    assert scp._server is None  # nothing was bound


def _rejection(result: int) -> A_ASSOCIATE:
    answer = A_ASSOCIATE()
    answer.result, answer.result_source, answer.diagnostic = result, 1, 3
    return answer


def test_a_rejection_the_requestor_missed_is_read_from_the_dul_queue() -> None:
    """pynetdicom's requestor can abort before reading a fast A-ASSOCIATE-RJ (it sees the
    connection the RJ closed and takes it for a failed connect): the RJ is still queued."""
    assoc = Association(AE(), mode="requestor")
    assert association_rejection(assoc) is None  # nothing came: no answer to quote
    assoc.dul.to_user_queue.put(A_P_ABORT())
    assert association_rejection(assoc) is None
    missed = _rejection(0x02)
    assoc.dul.to_user_queue.put(missed)
    assert not assoc.is_rejected
    found = association_rejection(assoc)
    assert found is missed and found.reason_str == "Calling AE title not recognised"


def test_a_rejection_the_requestor_read_is_the_one_quoted() -> None:
    assoc = Association(AE(), mode="requestor")
    read = _rejection(0x01)
    assoc.acceptor.primitive = read
    assoc.is_rejected = True
    assert association_rejection(assoc) is read


def _store_primitives() -> tuple[C_STORE, C_STORE]:
    request, reply = C_STORE(), C_STORE()
    request.MessageID, request.AffectedSOPClassUID = 7, "1.2.840.10008.5.1.4.1.1.7"
    request.AffectedSOPInstanceUID, request.Priority = "1.2.3.4", 2
    request.DataSet = BytesIO(b"")
    reply.MessageIDBeingRespondedTo, reply.Status = 7, 0x0000
    reply.AffectedSOPClassUID, reply.AffectedSOPInstanceUID = request.AffectedSOPClassUID, "1.2.3.4"
    return request, reply


def test_the_reactor_leaves_a_reply_to_the_sender_waiting_for_it() -> None:
    """While a `send_*` waits (the reactor checkpoint clear), the reactor's non-blocking read
    does not take a reply; with no sender waiting it takes it (and drops it as before); requests
    are the reactor's either way. The sender's blocking read gets the reply."""
    request, reply = _store_primitives()
    assert request.is_valid_request and reply.is_valid_response
    assoc = Association(AE(), mode="requestor")
    assoc.dimse.__class__ = ReplyKeepingDIMSE
    assoc._reactor_checkpoint.clear()  # a sender is waiting for its reply
    assoc.dimse.msg_queue.put((1, reply))
    assert assoc.dimse.get_msg(block=False) == (None, None)
    assert assoc.dimse.get_msg(block=True) == (1, reply)
    assoc.dimse.msg_queue.put((1, request))
    assert assoc.dimse.get_msg(block=False) == (1, request)
    assoc._reactor_checkpoint.set()  # nobody waits: a late reply is the reactor's to drop
    assoc.dimse.msg_queue.put((1, reply))
    assert assoc.dimse.get_msg(block=False) == (1, reply)
    assert assoc.dimse.get_msg(block=False) == (None, None)

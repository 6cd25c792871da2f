"""Who may associate (node/admission.py): the pure rules and the counters, without a socket
(tests/faults/test_admission.py drives them over the wire)."""

from __future__ import annotations

import socket
from pathlib import Path

from node.admission import (
    MAX_CONTEXTS_DESCRIBED,
    AssociationLimiter,
    PendingConnections,
    admission_rejection,
    describe_refused_contexts,
    disk_rejection,
)
from node.pynetdicom_internals import RefusedContext
from node.vocabulary import (
    MG_FOR_PRESENTATION,
    REJECT_CALLED_AE_NOT_RECOGNISED,
    REJECT_CALLING_AE_NOT_RECOGNISED,
    REJECT_LOCAL_LIMIT_EXCEEDED,
    REJECT_NO_REASON_GIVEN,
    VERIFICATION,
)
from tests.support.settings import make_settings

MG = str(MG_FOR_PRESENTATION)


# --- the disk watermark at association negotiation ---------------------------------------------
def test_disk_rejection_below_the_watermark_is_transient_for_storage_only() -> None:
    assert disk_rejection(10, 100, [MG, VERIFICATION]) == REJECT_LOCAL_LIMIT_EXCEEDED
    assert REJECT_LOCAL_LIMIT_EXCEEDED == (0x02, 0x03, 0x02)
    assert disk_rejection(10, 100, [VERIFICATION]) is None  # a C-ECHO still gets through
    assert disk_rejection(100, 100, [MG]) is None


def test_ae_titles_and_hosts_are_checked_in_order(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, listener=True, allowed_callers=[
        {"ae_title": "STORESCU", "host": "127.0.0.1"}, {"ae_title": "ANYHOST"}])
    assert admission_rejection(settings, "STORESCU", "MAMMO_NODE  ", "127.0.0.1") is None
    assert admission_rejection(settings, "ANYHOST", "MAMMO_NODE", "10.0.0.9") is None
    assert admission_rejection(settings, "STORESCU", "OTHER", "127.0.0.1") == (
        REJECT_CALLED_AE_NOT_RECOGNISED, "called_ae_title_not_recognised")
    assert admission_rejection(settings, "STRANGER", "MAMMO_NODE", "127.0.0.1") == (
        REJECT_CALLING_AE_NOT_RECOGNISED, "calling_ae_title_not_recognised")
    assert admission_rejection(settings, "STORESCU", "MAMMO_NODE", "10.0.0.9") == (
        REJECT_CALLING_AE_NOT_RECOGNISED, "calling_host_not_allowed")


def test_the_limiter_counts_each_holder_once() -> None:
    limiter = AssociationLimiter(2)
    first, second, third = object(), object(), object()
    assert limiter.acquire(first) and limiter.acquire(second)
    assert not limiter.acquire(third) and limiter.active == 2
    limiter.release(first)
    limiter.release(first)  # negotiation failure and the end of the connection both release
    assert limiter.active == 1
    limiter.release(third)  # never held a slot
    assert limiter.active == 1 and limiter.acquire(third)


def test_pending_connections_evict_the_oldest() -> None:
    pending = PendingConnections(2)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        first, _ = pending.enter(pairs[0][0], "10.0.0.1")
        second, _ = pending.enter(pairs[1][0], "10.0.0.2")
        third, evicted = pending.enter(pairs[2][0], "10.0.0.3")
        assert evicted == ["10.0.0.1"] and len(pending) == 2
        assert pending.was_evicted(first) and not pending.was_evicted(second)
        assert pairs[0][1].recv(1) == b""  # the oldest was shut down
        pending.leave(first)
        assert not pending.was_evicted(first)
        pending.leave(second)
        pending.leave(third)
        assert len(pending) == 0
    finally:
        for left, right in pairs:
            left.close()
            right.close()


def test_more_presentation_contexts_than_the_cap_are_refused_after_the_ae_checks(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path, listener=True, node={"max_presentation_contexts": 4})
    assert admission_rejection(settings, "STORESCU", "MAMMO_NODE", "127.0.0.1", 4) is None
    assert admission_rejection(settings, "STORESCU", "MAMMO_NODE", "127.0.0.1", 5) == (
        REJECT_NO_REASON_GIVEN, "too_many_presentation_contexts")
    assert REJECT_NO_REASON_GIVEN == (0x01, 0x01, 0x01)
    # a stranger is told it is a stranger, however many contexts it brings
    assert admission_rejection(settings, "STRANGER", "MAMMO_NODE", "127.0.0.1", 10_000) == (
        REJECT_CALLING_AE_NOT_RECOGNISED, "calling_ae_title_not_recognised")


def test_refused_contexts_are_described_without_a_peers_junk() -> None:
    refused = [RefusedContext(3, "1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2.1",), 0x03),
               RefusedContext(5, "1.2.3\x00<script>", ("../x",), 0x04)]
    refused += [RefusedContext(7 + 2 * i, MG, (), 0x01) for i in range(40)]
    described = describe_refused_contexts(refused)
    assert described[0] == {"context_id": 3, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                            "transfer_syntaxes": ["1.2.840.10008.1.2.1"],
                            "reason": "abstract_syntax_not_supported"}
    assert described[1]["sop_class_uid"] == "(invalid)"
    assert described[1]["transfer_syntaxes"] == ["(invalid)"]
    assert described[1]["reason"] == "transfer_syntaxes_not_supported"
    assert described[2]["reason"] == "user_rejection"
    assert len(described) == MAX_CONTEXTS_DESCRIBED

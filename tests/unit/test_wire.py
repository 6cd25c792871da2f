"""The PDU guard's rules (node/wire.py) on bytes and a socket pair, without pynetdicom
(tests/faults/test_protocol_abuse.py drives them through a live listener)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ

from node.wire import (
    MAX_ASSOCIATE_PDU_BYTES,
    MAX_COMMAND_SET_BYTES,
    MAX_INLINE_DATA_SET_BYTES,
    AssociateRequestSummary,
    MessageMeter,
    PeerClosed,
    WireLimits,
    WireViolation,
    command_elements,
    command_field,
    pdu_cap,
    read_pdu,
    summarise_associate_request,
    without_presentation_contexts,
)

LIMITS = WireLimits(max_pdata_pdu_bytes=1000, max_message_bytes=5000, pdu_timeout_s=0.5,
                    io_timeout_s=1.0)


def _command_set(field: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, 0x0100, 2, field)


def _p_data(*pdvs: tuple[int, bytes]) -> bytes:
    items = b"".join(struct.pack(">IBB", len(value) + 2, 1, control) + value
                     for control, value in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_caps_by_pdu_type() -> None:
    assert pdu_cap(0x01, LIMITS) == pdu_cap(0x02, LIMITS) == MAX_ASSOCIATE_PDU_BYTES
    assert pdu_cap(0x04, LIMITS) == 1000
    assert all(pdu_cap(kind, LIMITS) == 1024 for kind in (0x03, 0x05, 0x06, 0x07))
    assert pdu_cap(0x09, LIMITS) is None


def test_command_field_is_read_from_an_encoded_command_set() -> None:
    assert command_field(struct.pack("<HHI", 0x0000, 0x0002, 4) + b"1.2\x00" + _command_set(1)) == 1
    assert command_field(b"") is None


def test_a_c_store_data_set_may_reach_the_message_cap_any_other_only_the_inline_cap() -> None:
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x03, _command_set(0x0001)))) is None  # C-STORE-RQ, last fragment
    assert meter.count(_p_data((0x00, b"x" * 900))) is None
    assert meter.count(_p_data((0x02, b"x" * 900))) is None  # 1 800 bytes in all: fine
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x03, _command_set(0x0001)))) is None
    assert all(meter.count(_p_data((0x00, b"x" * 900))) is None for _ in range(5))
    assert meter.count(_p_data((0x00, b"x" * 900))) == "message_too_long"
    meter = MessageMeter(WireLimits(10**9, 10**9, 1.0, 1.0))
    assert meter.count(_p_data((0x03, _command_set(0x0030)))) is None  # C-ECHO-RQ
    chunk = b"x" * (MAX_INLINE_DATA_SET_BYTES // 2)
    assert meter.count(_p_data((0x00, chunk), (0x00, chunk))) is None
    assert meter.count(_p_data((0x00, b"x"))) == "message_too_long"


def test_a_command_set_that_never_ends_is_refused() -> None:
    meter = MessageMeter(WireLimits(10**9, 10**9, 1.0, 1.0))
    assert meter.count(_p_data((0x01, b"x" * MAX_COMMAND_SET_BYTES))) is None
    assert meter.count(_p_data((0x01, b"x"))) == "command_set_too_long"


def test_read_pdu_reads_one_whole_pdu(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    pdu = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # A-RELEASE-RQ
    theirs.sendall(pdu + pdu)
    assert read_pdu(ours, LIMITS, MessageMeter(LIMITS)) == pdu


def test_read_pdu_refuses_a_length_over_the_cap_before_reading_the_body(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(struct.pack(">BBL", 0x04, 0, 1001))
    with pytest.raises(WireViolation, match="pdu_too_long"):
        read_pdu(ours, LIMITS, MessageMeter(LIMITS))
    theirs.sendall(struct.pack(">BBL", 0x0A, 0, 4))
    with pytest.raises(WireViolation, match="pdu_type_unknown"):
        read_pdu(ours, LIMITS, MessageMeter(LIMITS))


def test_read_pdu_has_a_deadline_for_the_whole_pdu(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00")  # the rest of the body never comes
    started = time.monotonic()
    with pytest.raises(WireViolation, match="pdu_incomplete_timeout"):
        read_pdu(ours, LIMITS, MessageMeter(LIMITS))
    assert time.monotonic() - started < 2


def test_read_pdu_reports_a_peer_that_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00")
    theirs.close()
    with pytest.raises(PeerClosed):
        read_pdu(ours, LIMITS, MessageMeter(LIMITS))


# --- fragments have a place in a message, whatever the order (issue 11, hole 1) -----------------
def _command(field: int, data_set_type: int = 0x0000) -> bytes:
    return (struct.pack("<HHIH", 0x0000, 0x0100, 2, field)
            + struct.pack("<HHIH", 0x0000, 0x0800, 2, data_set_type))


def test_a_data_set_fragment_without_a_command_announcing_one_is_refused() -> None:
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x00, b"x"))) == "data_set_without_command"  # before any command
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x03, _command(0x0001)), (0x02, b"x" * 10))) is None
    assert meter.count(_p_data((0x00, b"x"))) == "data_set_without_command"  # after a whole store
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x03, _command(0x0030, 0x0101)))) is None  # C-ECHO, no data set
    assert meter.count(_p_data((0x02, b"x"))) == "data_set_without_command"
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x01, _command(0x0001)[:6]))) is None  # a command, unfinished
    assert meter.count(_p_data((0x00, b"x"))) == "data_set_without_command"


def test_a_command_in_the_middle_of_a_data_set_is_refused() -> None:
    meter = MessageMeter(LIMITS)
    assert meter.count(_p_data((0x03, _command(0x0001)), (0x00, b"x" * 10))) is None
    assert meter.count(_p_data((0x03, _command(0x0001)))) == "command_during_data_set"


def test_a_command_set_read_two_ways_is_refused() -> None:
    """CommandField twice (C-STORE first, C-ECHO last): one reader would grant a C-STORE's cap to
    a data set another holds in memory."""
    twice = _command(0x0001) + struct.pack("<HHIH", 0x0000, 0x0100, 2, 0x0030)
    assert MessageMeter(LIMITS).count(_p_data((0x03, twice))) == "command_set_malformed"
    assert MessageMeter(LIMITS).count(_p_data((0x03, b"\x00\x00\x00"))) == "command_set_malformed"
    other_group = struct.pack("<HHIH", 0x0008, 0x0100, 2, 1)
    assert MessageMeter(LIMITS).count(_p_data((0x03, other_group))) == "command_set_malformed"
    assert command_elements(twice) is None
    assert command_elements(_command(0x0001)) == {0x0100: b"\x01\x00", 0x0800: b"\x00\x00"}


def test_messages_follow_each_other_on_one_association() -> None:
    meter = MessageMeter(LIMITS)
    for _ in range(3):
        assert meter.count(_p_data((0x03, _command(0x0001)), (0x00, b"x" * 900))) is None
        assert meter.count(_p_data((0x02, b"x" * 900), (0x03, _command(0x0030, 0x0101)))) is None


# --- an A-ASSOCIATE-RQ read without decoding it (hole 3) -----------------------------------------
def _associate_rq(contexts: int) -> bytes:
    body = struct.pack(">HH", 1, 0) + b"MAMMO_NODE".ljust(16) + b"STRANGER".ljust(16) + bytes(32)
    body += struct.pack(">BBH", 0x10, 0, 21) + b"1.2.840.10008.3.1.1.1"
    for context_id in range(contexts):
        abstract = b"1.2.840.10008.1.1\x00"
        item = struct.pack(">BBBB", 2 * context_id + 1, 0, 0, 0)
        item += struct.pack(">BBH", 0x30, 0, len(abstract)) + abstract
        item += struct.pack(">BBH", 0x40, 0, 18) + b"1.2.840.10008.1.2\x00"
        body += struct.pack(">BBH", 0x20, 0, len(item)) + item
    user = struct.pack(">BBHL", 0x51, 0, 4, 16384)
    body += struct.pack(">BBH", 0x50, 0, len(user)) + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def test_an_associate_request_is_summarised_from_its_item_headers() -> None:
    summary = summarise_associate_request(_associate_rq(3))
    assert summary == AssociateRequestSummary("MAMMO_NODE", "STRANGER", 3)
    assert summarise_associate_request(b"\x02" + bytes(80)) is None  # not a request
    assert summarise_associate_request(_associate_rq(3)[:40]) is None  # too short


def test_a_request_without_its_contexts_decodes_to_the_same_ae_titles_and_no_context() -> None:
    stripped = without_presentation_contexts(_associate_rq(50))
    assert summarise_associate_request(stripped) == AssociateRequestSummary(
        "MAMMO_NODE", "STRANGER", 0)
    assert len(stripped) < len(_associate_rq(1))
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(stripped)
    primitive = pdu.to_primitive()
    assert primitive.calling_ae_title == "STRANGER"
    assert primitive.called_ae_title == "MAMMO_NODE"
    assert primitive.presentation_context_definition_list == []
    assert primitive.maximum_length_received == 16384

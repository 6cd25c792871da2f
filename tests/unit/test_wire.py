"""The PDU guard's rules (node/wire.py) on bytes and a socket pair, without pynetdicom
(tests/faults/test_protocol_abuse.py drives them through a live listener)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from node.wire import (
    MAX_ASSOCIATE_PDU_BYTES,
    MAX_COMMAND_SET_BYTES,
    MAX_INLINE_DATA_SET_BYTES,
    MessageMeter,
    PeerClosed,
    WireLimits,
    WireViolation,
    command_field,
    pdu_cap,
    read_pdu,
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

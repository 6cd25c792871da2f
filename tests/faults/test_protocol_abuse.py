"""Hostile bytes on the listener: every one ends in an A-ABORT or a closed connection, early, with
bounded memory, and the node answers C-ECHO afterwards.

The PDUs are packed by hand (tests/support/dicom_wire.py): no toolkit sends these. The listener
runs in this process, so the memory figures are this process's VmRSS/VmHWM, read from /proc;
the attacking side sends from one preallocated buffer, so it adds nothing that grows.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.audit import read_audit
from node.scp import StoreSCP
from node.scu import echo
from tests.support.dicom_wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    MG_FOR_PRESENTATION,
    VERIFICATION,
    associate,
    associate_ac,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    connect,
    echoscu,
    p_data,
    peak_rss_bytes,
    read_pdu,
    reset_peak_rss,
    rss_bytes,
    running_listener,
    wait_closed,
    wait_until,
)
from tests.support.settings import make_settings

pytestmark = [pytest.mark.requires_bin("echoscu"), pytest.mark.timeout(120)]

MAX_PDU_BYTES = 16384
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
NETWORK_TIMEOUT_S = 2.0
ACSE_TIMEOUT_S = 3.0
MIB = 1024 * 1024
# What the node may grow by while a peer pushes 64 MiB at it (stock pynetdicom: all of it).
RSS_BOUND_BYTES = 32 * MIB


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    settings = make_settings(
        tmp_path_factory.mktemp("abuse"), listener=True,
        node={"max_pdu_bytes": MAX_PDU_BYTES, "max_message_bytes": MAX_MESSAGE_BYTES,
              "network_timeout_s": NETWORK_TIMEOUT_S, "acse_timeout_s": ACSE_TIMEOUT_S},
    )
    with running_listener(settings) as scp:
        yield scp


def _port(node: StoreSCP) -> int:
    return node.settings.node.port


def _assert_still_serving(node: StoreSCP) -> None:
    """After the fault: the C-ECHO works and no association slot is left held."""
    result = echoscu(_port(node))
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until(lambda: node.limiter.active == 0, 10), "an association slot stayed held"


def _aborts(node: StoreSCP, reason: str) -> list[dict]:
    return [r for r in read_audit(node.audit.path)
            if r["event"] == "association_aborted" and r.get("reason") == reason]


class _Pusher(threading.Thread):
    """Sends `total` bytes of `chunk` repeatedly until the peer stops taking them."""

    def __init__(self, sock: socket.socket, chunk: bytes, total: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.chunk, self.total, self.sent = sock, chunk, total, 0

    def run(self) -> None:
        try:
            self.sock.settimeout(5)  # inside: the socket may be closed before this thread runs
            while self.sent < self.total:
                self.sock.sendall(self.chunk)
                self.sent += len(self.chunk)
        except OSError:
            pass  # reset, broken pipe, closed or a peer that stopped reading: what we expect


def _measure(name: str, started: float, rss_before: int) -> None:
    """Print the figures the fault matrix in docs/RELIABILITY.md quotes (pytest -s)."""
    growth = max(0, peak_rss_bytes() - rss_before)
    print(f"\n[{name}] over after {time.monotonic() - started:.3f} s, "
          f"node peak RSS growth {growth / MIB:.1f} MiB (VmRSS now {rss_bytes() / MIB:.0f} MiB)")
    assert growth < RSS_BOUND_BYTES, f"{name}: memory grew by {growth / MIB:.1f} MiB"


def test_pdu_longer_than_negotiated_is_aborted_before_its_body_is_read(node: StoreSCP) -> None:
    sock, answer = associate(_port(node))
    assert answer.type == A_ASSOCIATE_AC
    reset_peak_rss()
    rss_before = peak_rss_bytes()
    started = time.monotonic()
    sock.sendall(struct.pack(">BBL", 0x04, 0, 256 * MIB))  # P-DATA-TF announcing 256 MiB
    pusher = _Pusher(sock, b"\x00" * MIB, 64 * MIB)
    pusher.start()
    abort = read_pdu(sock, timeout_s=15)
    assert abort.type == A_ABORT
    assert abort.abort_source() == 0x02  # service provider
    assert wait_closed(sock, 15)
    pusher.join(15)
    _measure("pdu_too_long", started, rss_before)
    assert pusher.sent < 64 * MIB, "the node kept reading a PDU it had refused"
    assert _aborts(node, "pdu_too_long")
    _assert_still_serving(node)


def test_associate_request_over_one_mib_is_aborted(node: StoreSCP) -> None:
    sock = connect(_port(node))
    reset_peak_rss()
    rss_before = peak_rss_bytes()
    started = time.monotonic()
    sock.sendall(struct.pack(">BBL", 0x01, 0, 2 * MIB))  # A-ASSOCIATE-RQ of 2 MiB
    pusher = _Pusher(sock, b"\x00" * MIB, 64 * MIB)
    pusher.start()
    assert read_pdu(sock, timeout_s=15).type == A_ABORT
    assert wait_closed(sock, 15)
    pusher.join(15)
    _measure("associate_rq_too_long", started, rss_before)
    assert _aborts(node, "pdu_too_long")
    _assert_still_serving(node)


@pytest.mark.parametrize("kind", ["c_store", "c_echo_with_data_set"])
def test_fragments_that_never_end_are_aborted_at_the_message_cap(node: StoreSCP, kind: str) -> None:
    if kind == "c_store":
        contexts = [(1, MG_FOR_PRESENTATION, [EXPLICIT_VR_LE])]
        command = c_store_rq(MG_FOR_PRESENTATION, generate_uid())
        cap = MAX_MESSAGE_BYTES
    else:  # anything but a C-STORE is held in memory by pynetdicom: a small cap
        contexts = [(1, VERIFICATION, [IMPLICIT_VR_LE])]
        command = c_echo_rq(with_data_set=True)
        cap = 1 * MIB
    sock, answer = associate(_port(node), contexts=contexts)
    assert answer.type == A_ASSOCIATE_AC
    reset_peak_rss()
    rss_before = peak_rss_bytes()
    started = time.monotonic()
    sock.sendall(p_data([(1, 0x03, command)]))
    fragment = p_data([(1, 0x00, b"\x00" * (MAX_PDU_BYTES - 6))])  # data set, never the last
    burst = fragment * 64  # ~1 MiB per sendall
    pusher = _Pusher(sock, burst, 64 * MIB)
    pusher.start()
    assert read_pdu(sock, timeout_s=30).type == A_ABORT
    assert wait_closed(sock, 15)
    pusher.join(15)
    _measure(f"message_too_long[{kind}]", started, rss_before)
    assert pusher.sent < 64 * MIB
    assert pusher.sent >= cap  # it read up to the cap, no further than the buffers hold
    assert _aborts(node, "message_too_long")
    tmp_dir = Path(node.spool.tmp_dir)
    assert wait_until(lambda: not any(tmp_dir.iterdir()), 10), "the partial receive stayed"
    _assert_still_serving(node)


def test_half_sent_pdu_is_aborted_after_the_network_timeout(node: StoreSCP) -> None:
    sock, answer = associate(_port(node))
    assert answer.type == A_ASSOCIATE_AC
    assert wait_until(lambda: node.limiter.active == 1, 5)
    started = time.monotonic()
    sock.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"\x00" * 10)  # 10 of 100 bytes, then silence
    abort = read_pdu(sock, timeout_s=NETWORK_TIMEOUT_S + 15)
    assert abort.type == A_ABORT
    assert wait_closed(sock, 15)
    print(f"\n[pdu_incomplete_timeout] abort after {time.monotonic() - started:.2f} s "
          f"(network_timeout_s={NETWORK_TIMEOUT_S})")
    assert _aborts(node, "pdu_incomplete_timeout")
    _assert_still_serving(node)  # the slot it held is free again


def test_half_sent_association_request_is_aborted(node: StoreSCP) -> None:
    sock = connect(_port(node))
    started = time.monotonic()
    sock.sendall(associate_rq("STORESCU", "MAMMO_NODE")[:40])  # header and a bit, then silence
    assert read_pdu(sock, timeout_s=NETWORK_TIMEOUT_S + 15).type == A_ABORT
    assert wait_closed(sock, 15)
    print(f"\n[associate_rq_incomplete] abort after {time.monotonic() - started:.2f} s")
    _assert_still_serving(node)


def test_a_pdu_trickled_byte_by_byte_is_aborted_at_the_pdu_deadline(node: StoreSCP) -> None:
    """Each byte arrives well within the socket timeout; the whole PDU does not."""
    sock = connect(_port(node))
    request = associate_rq("STORESCU", "MAMMO_NODE")
    started = time.monotonic()
    sock.settimeout(0.4)
    aborted = False
    for byte in request:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(6)[:1] == bytes([A_ABORT]):
                aborted = True
                break
        except TimeoutError:
            continue
        except OSError:
            break
    assert aborted, "the trickled request was never aborted"
    print(f"\n[pdu_trickled] abort after {time.monotonic() - started:.2f} s")
    assert _aborts(node, "pdu_incomplete_timeout")
    _assert_still_serving(node)


def test_unknown_pdu_type_is_aborted(node: StoreSCP) -> None:
    sock, answer = associate(_port(node))
    assert answer.type == A_ASSOCIATE_AC
    sock.sendall(struct.pack(">BBL", 0x09, 0, 4) + b"\x00" * 4)
    assert read_pdu(sock, timeout_s=15).type == A_ABORT
    assert wait_closed(sock, 15)
    assert _aborts(node, "pdu_type_unknown")
    _assert_still_serving(node)


def test_a_silent_connection_is_closed_after_the_acse_timeout(node: StoreSCP) -> None:
    sock = connect(_port(node))
    started = time.monotonic()
    assert wait_closed(sock, ACSE_TIMEOUT_S + 15), "an idle connection was kept open"
    print(f"\n[idle_connection] closed after {time.monotonic() - started:.2f} s "
          f"(acse_timeout_s={ACSE_TIMEOUT_S})")
    _assert_still_serving(node)


# --- the sender faces a hostile PACS -------------------------------------------------------------
class _HostilePacs(threading.Thread):
    """Accepts one association, answers the C-ECHO-RQ with `attack`, notes whether we abort."""

    def __init__(self, attack: bytes, push: bool) -> None:
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.attack, self.push = attack, push
        self.got_abort = False
        self.pusher: _Pusher | None = None

    def run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            request = read_pdu(conn, 30)
            called, calling = request.body[4:20].decode(), request.body[20:36].decode()
            conn.sendall(associate_ac(calling, called, [(1, IMPLICIT_VR_LE)]))
            read_pdu(conn, 30)  # the C-ECHO-RQ
            conn.sendall(self.attack)
            if self.push:
                self.pusher = _Pusher(conn, b"\x00" * MIB, 64 * MIB)
                self.pusher.start()
            try:
                while True:
                    if read_pdu(conn, 30).type == A_ABORT:
                        self.got_abort = True
                        return
            except (ConnectionError, OSError):
                return
        self.server.close()


@pytest.mark.parametrize("attack", ["pdu_too_long", "pdu_incomplete_timeout"])
def test_a_hostile_pacs_can_neither_flood_nor_stall_the_sender(tmp_path: Path, attack: str) -> None:
    if attack == "pdu_too_long":
        pacs = _HostilePacs(struct.pack(">BBL", 0x04, 0, 256 * MIB), push=True)
    else:
        pacs = _HostilePacs(struct.pack(">BBL", 0x04, 0, 100) + b"\x00" * 10, push=False)
    pacs.start()
    settings = make_settings(
        tmp_path, listener=True, node={"max_pdu_bytes": MAX_PDU_BYTES},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs.port, "timeout_s": 2}])
    reset_peak_rss()
    rss_before = peak_rss_bytes()
    started = time.monotonic()
    assert echo(settings, settings.destinations[0]) != 0x0000  # no answer, and no hang
    pacs.join(30)
    _measure(f"sender:{attack}", started, rss_before)
    assert pacs.got_abort, "the PACS never got an A-ABORT"
    if pacs.pusher is not None:
        pacs.pusher.join(15)
        assert pacs.pusher.sent < 64 * MIB

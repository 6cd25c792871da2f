"""The four holes found by attacking a running node (issue 11), each closed and checked with the
node's memory and its spool's tmp/ after it:

1. data set fragments that no command announced (or past the cap of what they belong to) are an
   A-ABORT at once, whatever the order of the PDUs: nothing is buffered;
2. a C-STORE aborted for a malformed command (or a fuzzed exchange) leaves nothing in tmp/, and
   every abort is audited with its reason; presentation contexts refused at negotiation are
   logged and audited;
3. a stranger's A-ASSOCIATE-RQ is rejected before its presentation contexts are decoded, and a
   request with more than `node.max_presentation_contexts` is rejected;
4. every line `mammo-node serve` writes to its log is one JSON object, library tracebacks
   included.

Holes 1-3 run against the listener in this process (memory: this process's VmRSS/VmHWM), hole 4
against a real `serve` process (memory: its VmRSS). PDUs are packed by hand
(tests/support/dicom_wire.py).
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid

from node.audit import read_audit
from node.scp import StoreSCP
from tests.support.dicom_wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    MG_FOR_PRESENTATION,
    VERIFICATION,
    associate,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    command_set,
    connect,
    echoscu,
    p_data,
    peak_rss_bytes,
    read_pdu,
    release_rq,
    reset_peak_rss,
    rss_bytes,
    running_listener,
    wait_closed,
    wait_until,
)
from tests.support.settings import make_settings, write_config

pytestmark = [pytest.mark.requires_bin("echoscu"), pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
MAX_PDU_BYTES = 16384
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
NETWORK_TIMEOUT_S = 1.5
MIB = 1024 * 1024
RSS_GROWTH_BOUND = 32 * MIB  # while a peer pushes up to 64 MiB (before the fix: all of it)
RSS_LEFT_BOUND = 16 * MIB  # what may stay after the associations are over
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # a SOP class the node does not take
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"  # a transfer syntax the node does not take


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    settings = make_settings(
        tmp_path_factory.mktemp("holes"), listener=True,
        node={"max_pdu_bytes": MAX_PDU_BYTES, "max_message_bytes": MAX_MESSAGE_BYTES,
              "network_timeout_s": NETWORK_TIMEOUT_S, "acse_timeout_s": 3,
              "max_presentation_contexts": 128},
    )
    with running_listener(settings) as scp:
        yield scp


def _port(node: StoreSCP) -> int:
    return node.settings.node.port


def _audit(node: StoreSCP, event: str) -> list[dict]:
    return [r for r in read_audit(node.audit.path) if r["event"] == event]


def _tmp_empty(node: StoreSCP) -> bool:
    return not any(Path(node.spool.tmp_dir).iterdir())


def _assert_whole_afterwards(node: StoreSCP, rss_before: int) -> None:
    """Memory back, tmp/ empty, no slot held, C-ECHO answered."""
    assert wait_until(lambda: _tmp_empty(node), 10), list(Path(node.spool.tmp_dir).iterdir())
    assert wait_until(lambda: node.limiter.active == 0, 10), "an association slot stayed held"
    result = echoscu(_port(node))
    assert result.returncode == 0, result.stdout + result.stderr
    left = rss_bytes() - rss_before
    print(f"  VmRSS after: {left / MIB:+.1f} MiB")
    assert left < RSS_LEFT_BOUND, f"memory not returned: {left / MIB:.1f} MiB"


def _push(sock: socket.socket, chunk: bytes, total: int) -> int:
    """Send `chunk` until `total` bytes or until the node stops taking them; bytes sent."""
    sock.settimeout(5)
    sent = 0
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # reset or broken pipe: the node aborted, as it should
    return sent


# --- hole 1: fragments nobody announced ------------------------------------------------------------
DATA_FRAGMENT = p_data([(1, 0x00, b"\x00" * (MAX_PDU_BYTES - 6))])  # a data set fragment, not last


def _duplicate_command_field() -> bytes:
    """CommandField twice: C-STORE-RQ for a reader taking the first, C-ECHO-RQ for one taking the
    last (pynetdicom): a C-STORE's cap on a data set held in memory."""
    command = command_set([(0x0002, VERIFICATION.encode() + b"\x00"),
                           (0x0100, struct.pack("<H", 0x0001)), (0x0110, struct.pack("<H", 1)),
                           (0x0800, struct.pack("<H", 0x0000))])
    return command + struct.pack("<HHLH", 0x0000, 0x0100, 2, 0x0030)


ORDERS = {
    # what comes first as (context id, control header, fragment), where the unannounced data set
    # fragments then go, and the violation the node names
    "after_a_whole_c_store": ([(1, 0x03, c_store_rq(MG_FOR_PRESENTATION, generate_uid())),
                               (1, 0x02, b"\x00" * 10)], 1, "data_set_without_command"),
    "before_any_command": ([], 1, "data_set_without_command"),
    "after_a_c_echo_without_data_set": ([(3, 0x03, c_echo_rq())], 3, "data_set_without_command"),
    "inside_an_unfinished_command": ([(3, 0x01, c_echo_rq()[:20])], 3,
                                     "data_set_without_command"),
    "after_an_ambiguous_command": ([(3, 0x03, _duplicate_command_field())], 3,
                                   "command_set_malformed"),
    "past_the_inline_cap": ([(3, 0x03, c_echo_rq(with_data_set=True))], 3, "message_too_long"),
}


def _read_until_abort(sock: socket.socket) -> bool:
    """Skip the node's answers (a C-ECHO-RSP, a C-STORE-RSP) until its A-ABORT."""
    try:
        while True:
            if read_pdu(sock, timeout_s=15).type == A_ABORT:
                return True
    except (OSError, ConnectionError):
        return False


@pytest.mark.parametrize("order", list(ORDERS))
def test_data_set_fragments_nobody_announced_are_aborted_whatever_the_order(
        node: StoreSCP, order: str) -> None:
    first, fragment_context, reason = ORDERS[order]
    contexts = [(1, MG_FOR_PRESENTATION, [EXPLICIT_VR_LE]), (3, VERIFICATION, [IMPLICIT_VR_LE])]
    rss_before = rss_bytes()
    sock, answer = associate(_port(node), contexts=contexts)
    assert answer.type == A_ASSOCIATE_AC
    if first:
        sock.sendall(p_data(first))
    reset_peak_rss()
    peak_before = peak_rss_bytes()
    fragment = p_data([(fragment_context, 0x00, b"\x00" * (MAX_PDU_BYTES - 6))])
    sent = _push(sock, fragment * 64, 64 * MIB)
    assert _read_until_abort(sock), "no A-ABORT"
    assert wait_closed(sock, 15)
    growth = peak_rss_bytes() - peak_before
    print(f"\n[{order}] {sent / MIB:.1f} MiB taken before the A-ABORT, "
          f"peak VmRSS growth {growth / MIB:.1f} MiB")
    assert sent < 8 * MIB, "the node kept reading fragments it had no message for"
    assert growth < RSS_GROWTH_BOUND
    assert wait_until(lambda: any(r.get("reason") == reason
                                  for r in _audit(node, "association_aborted")), 5), reason
    _assert_whole_afterwards(node, rss_before)


# --- hole 2: nothing of an aborted store stays, every abort audited ------------------------------
def _store_with_command(command: bytes, context_id: int = 1, fragments: int = 18,
                        finished: bool = True) -> bytes:
    """A C-STORE: its command, `fragments` data set fragments, then (if `finished`) the last."""
    pdus = [p_data([(context_id, 0x03, command)]), *[DATA_FRAGMENT] * fragments]
    if finished:
        pdus.append(p_data([(1, 0x02, b"\x00" * 100)]))
    return b"".join(pdus)


MALFORMED_STORES = {
    # a NUL inside the command's SOP Class UID: pynetdicom finds no service class and aborts
    "nul_in_sop_class_uid": (_store_with_command(
        c_store_rq(MG_FOR_PRESENTATION[:-2] + "\x00" + "2", generate_uid())),
        "sop_class_not_supported"),
    # a C-STORE on a context that was never accepted: stock pynetdicom's DUL thread dies
    "context_never_accepted": (_store_with_command(
        c_store_rq(MG_FOR_PRESENTATION, generate_uid()), context_id=5),
        "dimse_message_undecodable:KeyError"),
    # a whole C-STORE, then an unknown PDU before its handler ran
    "whole_store_then_garbage": (_store_with_command(
        c_store_rq(MG_FOR_PRESENTATION, generate_uid()))
        + struct.pack(">BBL", 0x09, 0, 4) + b"\x00" * 4, "pdu_type_unknown"),
    # half a data set, then the peer goes quiet
    "data_set_left_unfinished": (_store_with_command(
        c_store_rq(MG_FOR_PRESENTATION, generate_uid()), finished=False), "network_timeout"),
}


@pytest.mark.parametrize("case", list(MALFORMED_STORES))
def test_an_aborted_store_leaves_nothing_and_its_abort_is_audited(
        node: StoreSCP, case: str) -> None:
    exchange, reason = MALFORMED_STORES[case]
    rss_before = rss_bytes()
    sock, answer = associate(_port(node), contexts=[(1, MG_FOR_PRESENTATION, [EXPLICIT_VR_LE])])
    assert answer.type == A_ASSOCIATE_AC
    sock.sendall(exchange)
    assert wait_closed(sock, NETWORK_TIMEOUT_S + 15), "the association was not aborted"
    records = []
    assert wait_until(lambda: bool(records.extend(
        r for r in _audit(node, "association_aborted") if r.get("reason") == reason) or records),
        10), f"no association_aborted record with reason {reason}"
    assert records[-1]["stage"] == "established"
    _assert_whole_afterwards(node, rss_before)


def _fuzzed(rng: random.Random, exchange: list[bytes]) -> list[bytes]:
    """One mutation of an exchange: flipped bytes, a cut, a PDU repeated or dropped."""
    pdus = list(exchange)
    index = rng.randrange(len(pdus))
    kind = rng.choice(("flip", "flip", "cut", "repeat", "drop"))
    if kind == "flip":
        data = bytearray(pdus[index])
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        pdus[index] = bytes(data)
    elif kind == "cut":
        pdus[index] = pdus[index][:rng.randrange(len(pdus[index]))]
        del pdus[index + 1:]
    elif kind == "repeat":
        pdus.insert(index, pdus[index])
    else:
        del pdus[index]
    return pdus


@pytest.mark.slow
def test_a_fuzzed_store_exchange_leaves_nothing_and_every_abort_is_audited(
        node: StoreSCP) -> None:
    """Seeded mutations of one C-STORE exchange after the association: each either ends in a
    release or in an abort that the audit trail records with its reason."""
    rng = random.Random(11)
    exchange = [p_data([(1, 0x03, c_store_rq(MG_FOR_PRESENTATION, generate_uid()))]),
                DATA_FRAGMENT, DATA_FRAGMENT, p_data([(1, 0x02, b"\x00" * 100)]), release_rq()]
    rss_before = rss_bytes()
    aborted_before = len(_audit(node, "association_aborted"))
    not_released = 0
    for _ in range(16):
        sock, answer = associate(_port(node),
                                 contexts=[(1, MG_FOR_PRESENTATION, [EXPLICIT_VR_LE])])
        assert answer.type == A_ASSOCIATE_AC
        released = False
        try:
            sock.sendall(b"".join(_fuzzed(rng, exchange)))
            deadline = time.monotonic() + NETWORK_TIMEOUT_S + 10
            while time.monotonic() < deadline:
                if read_pdu(sock, timeout_s=NETWORK_TIMEOUT_S + 10).type == A_RELEASE_RP:
                    released = True
                    break
        except (OSError, ConnectionError):
            pass  # aborted or closed
        finally:
            sock.close()
        not_released += not released
    print(f"\n[fuzz] 16 exchanges, {not_released} ended without a release")
    assert not_released > 0
    assert wait_until(lambda: len(_audit(node, "association_aborted")) - aborted_before
                      == not_released, 15), "an abort went unaudited (or was audited twice)"
    new = _audit(node, "association_aborted")[aborted_before:]
    assert all(r.get("reason") for r in new)
    _assert_whole_afterwards(node, rss_before)


def test_contexts_refused_at_negotiation_are_logged_and_audited(node: StoreSCP) -> None:
    contexts = [(1, MG_FOR_PRESENTATION, [EXPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE]),
                (5, MG_FOR_PRESENTATION, [DEFLATED_EXPLICIT_VR_LE])]
    sock, answer = associate(_port(node), contexts=contexts)
    assert answer.type == A_ASSOCIATE_AC
    sock.sendall(release_rq())
    assert read_pdu(sock).type == A_RELEASE_RP
    sock.close()
    records = _audit(node, "presentation_contexts_refused")
    assert records, "no presentation_contexts_refused record"
    record = records[-1]
    assert record["calling_ae"] == "STORESCU" and record["accepted_count"] == 1
    refused = {entry["context_id"]: entry for entry in record["refused"]}
    assert refused[3]["sop_class_uid"] == CT_IMAGE_STORAGE
    assert refused[3]["reason"] == "abstract_syntax_not_supported"
    assert refused[5]["transfer_syntaxes"] == [DEFLATED_EXPLICIT_VR_LE]
    assert refused[5]["reason"] == "transfer_syntaxes_not_supported"


# --- hole 3: strangers are refused unread, and so are floods of contexts ------------------------
def _contexts(count: int, even_ids: bool = False) -> list[tuple[int, str, list[str]]]:
    return [((i % 128) * 2 + (0 if even_ids else 1), MG_FOR_PRESENTATION,
             [EXPLICIT_VR_LE, IMPLICIT_VR_LE]) for i in range(count)]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_strangers_with_10000_contexts_are_rejected_before_the_contexts_are_read(
        node: StoreSCP) -> None:
    # Even context IDs are invalid (PS3.8 9.3.2.2): decoding them would kill the reader with a
    # ValueError. A proper A-ASSOCIATE-RJ shows the contexts were never decoded.
    request = associate_rq("STRANGER", "MAMMO_NODE", _contexts(10_000, even_ids=True))
    rejected_before = len(_audit(node, "association_rejected"))

    def sixteen_strangers() -> None:
        for _ in range(16):
            sock = connect(_port(node))
            sock.sendall(request)
            answer = read_pdu(sock, timeout_s=30)
            sock.close()
            assert answer.type == A_ASSOCIATE_RJ
            assert answer.rejection() == (0x01, 0x01, 0x03)  # permanent, calling AE not recognised

    # The first round may leave the allocator holding the freed request buffers (about the
    # size of what was sent); a second round must not add to it: nothing is kept per request.
    cpu_before = _cpu_s()
    sixteen_strangers()
    print(f"\n[strangers] 16 requests of {len(request) / MIB:.2f} MiB: "
          f"{_cpu_s() - cpu_before:.2f} s of CPU in this process")
    rss_after_first_round = rss_bytes()
    sixteen_strangers()
    new = _audit(node, "association_rejected")[rejected_before:]
    assert len(new) == 32
    assert all(r["reason"] == "calling_ae_title_not_recognised"
               and r["presentation_contexts"] == 10_000 and r["calling_ae"] == "STRANGER"
               for r in new)
    _assert_whole_afterwards(node, rss_after_first_round)


def test_more_presentation_contexts_than_the_cap_are_rejected(node: StoreSCP) -> None:
    rss_before = rss_bytes()
    sock = connect(_port(node))
    sock.sendall(associate_rq("STORESCU", "MAMMO_NODE", _contexts(129)))
    answer = read_pdu(sock, timeout_s=30)
    sock.close()
    assert answer.type == A_ASSOCIATE_RJ
    assert answer.rejection() == (0x01, 0x01, 0x01)  # permanent, no reason given
    record = _audit(node, "association_rejected")[-1]
    assert record["reason"] == "too_many_presentation_contexts"
    assert record["presentation_contexts"] == 129
    sock, answer = associate(_port(node), contexts=_contexts(128))  # at the cap: fine
    assert answer.type == A_ASSOCIATE_AC
    sock.sendall(release_rq())
    assert read_pdu(sock).type == A_RELEASE_RP
    sock.close()
    _assert_whole_afterwards(node, rss_before)


# --- hole 4: every line of a real node's log is JSON -----------------------------------------------
@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`mammo-node serve` as a process of its own, its output (stdout and stderr) in node.log."""
    config = write_config(tmp_path / "node.yaml", listener=True,
                          node={"network_timeout_s": NETWORK_TIMEOUT_S,
                                "max_pdu_bytes": MAX_PDU_BYTES})
    port = int(yaml.safe_load(config.read_text())["node"]["port"])
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: echoscu(port).returncode == 0 or process.poll() is not None,
                          30)
        assert process.poll() is None, log_path.read_text()
        yield process, port, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_a_sigterm_while_serve_starts_stops_it_cleanly(tmp_path: Path) -> None:
    """SIGTERM delivered while the node is starting (here: as its listener starts, the moment a
    supervisor or a script that saw the port answer may send it) ends `serve` cleanly with status
    0 and the listener closed, not killed by the signal's default action."""
    config = write_config(tmp_path / "node.yaml", listener=True)
    port = int(yaml.safe_load(config.read_text())["node"]["port"])
    code = ("import os, signal, sys\n"
            "from node import cli, service\n"
            "real = service.NodeService.start\n"
            "def start(self):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    real(self)\n"
            "service.NodeService.start = start\n"
            "sys.exit(cli.main(['serve', '--config', sys.argv[1]]))\n")
    result = subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert echoscu(port).returncode != 0  # nothing listens any more


def _exchange(port: int, data: bytes, contexts: list[tuple[int, str, list[str]]] | None = None,
              request: bytes | None = None) -> None:
    sock = connect(port)
    try:
        sock.sendall(request or associate_rq("STORESCU", "MAMMO_NODE", contexts or [
            (1, MG_FOR_PRESENTATION, [EXPLICIT_VR_LE])]))
        read_pdu(sock)
        sock.sendall(data)
        wait_closed(sock, NETWORK_TIMEOUT_S + 10)
    except (OSError, ConnectionError):
        pass
    finally:
        sock.close()


@pytest.mark.slow
def test_every_line_of_a_real_nodes_log_is_one_json_object(
        serve: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    process, port, log_path = serve
    rss_before = rss_bytes(process.pid)
    store = c_store_rq(MG_FOR_PRESENTATION, generate_uid())
    _exchange(port, _store_with_command(  # pydicom warns about the UID; pynetdicom aborts
        c_store_rq(MG_FOR_PRESENTATION[:-2] + "\x00" + "2", generate_uid())))
    _exchange(port, _store_with_command(store, context_id=5))
    _exchange(port, struct.pack(">BBL", 0x09, 0, 4) + b"\x00" * 4)
    _exchange(port, DATA_FRAGMENT * 4)
    _exchange(port, b"", request=associate_rq("STORESCU", "MAMMO_NODE",
                                              _contexts(4, even_ids=True)))
    _exchange(port, b"", request=associate_rq("STRANGER", "MAMMO_NODE", _contexts(2000)))
    rng = random.Random(4)
    for _ in range(6):
        _exchange(port, b"".join(_fuzzed(rng, [p_data([(1, 0x03, store)]), DATA_FRAGMENT,
                                               p_data([(1, 0x02, b"\x00" * 64)]),
                                               release_rq()])))
    assert echoscu(port).returncode == 0
    assert process.poll() is None
    spool_tmp = log_path.parent / "spool" / "tmp"
    assert wait_until(lambda: not any(spool_tmp.iterdir()), 10), list(spool_tmp.iterdir())
    left = rss_bytes(process.pid) - rss_before
    print(f"\n[serve] VmRSS after the exchanges: {left / MIB:+.1f} MiB")
    assert left < RSS_LEFT_BOUND
    lines = log_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 10
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"node.log line {number} is not JSON: {line[:200]!r}")
    assert all(isinstance(record, dict) and "event" in record for record in records)
    events = {record["event"] for record in records}
    assert {"association_aborted", "association_rejected"} <= events
    # what used to come out raw: pydicom's warning and the state machine's exception
    assert any(record.get("logger") == "py.warnings" for record in records)
    assert "protocol_state_error" in events
    assert "\x00" not in log_path.read_text(encoding="utf-8")

"""Raw DICOM Upper Layer PDUs, packed by hand, for tests that must send what no toolkit would.

Only what the fault tests need: A-ASSOCIATE-RQ, P-DATA-TF with chosen PDVs, C-ECHO-RQ and
C-STORE-RQ command sets, A-RELEASE-RQ, and a PDU reader with a deadline (PS3.8 9.3, PS3.7 E).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node.completion import AssociationTracker
from node.scp import StoreSCP
from node.settings import Settings
from node.spool import Spool
from tools.stack.services import find_binary

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.99.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(calling: str, called: str,
                 contexts: list[tuple[int, str, list[str]]] | None = None,
                 max_pdu_bytes: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ proposing `contexts` as (context id, abstract syntax, transfer syntaxes)."""
    contexts = contexts or [(1, VERIFICATION, [IMPLICIT_VR_LE])]
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += b"\x00" * 32 + _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        value = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, abstract.encode())
        for syntax in syntaxes:
            value += _item(0x40, syntax.encode())
        body += _item(0x20, value)
    user = _item(0x51, struct.pack(">L", max_pdu_bytes)) + _item(0x52, IMPLEMENTATION_UID.encode())
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """P-DATA-TF with PDVs (context id, message control header, fragment)."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cid, control) + data
                    for cid, control, data in pdvs)
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, b"\x00" * 4)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """An Implicit VR Little Endian command set with its group length."""
    encoded = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x0000, struct.pack("<L", len(encoded))) + encoded


def c_echo_rq(message_id: int = 1, with_data_set: bool = False) -> bytes:
    return command_set([(0x0002, _uid(VERIFICATION)), (0x0100, struct.pack("<H", 0x0030)),
                        (0x0110, struct.pack("<H", message_id)),
                        (0x0800, struct.pack("<H", 0x0000 if with_data_set else 0x0101))])


def c_store_rq(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    return command_set([(0x0002, _uid(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
                        (0x0110, struct.pack("<H", message_id)), (0x0700, b"\x00\x00"),
                        (0x0800, struct.pack("<H", 0x0000)), (0x1000, _uid(sop_uid))])


def command_status(command: bytes) -> int | None:
    """Status (0000,0900) of an encoded command set, None when absent."""
    offset = 0
    while offset + 8 <= len(command):
        _, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if element == 0x0900 and length == 2:
            return int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return None


@dataclass
class Pdu:
    type: int
    body: bytes

    def rejection(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        assert self.type == A_ASSOCIATE_RJ, f"not an A-ASSOCIATE-RJ: 0x{self.type:02X}"
        return self.body[1], self.body[2], self.body[3]

    def abort_source(self) -> int:
        assert self.type == A_ABORT
        return self.body[2]

    def pdvs(self) -> list[tuple[int, int, bytes]]:
        assert self.type == P_DATA_TF
        items, offset = [], 0
        while offset + 6 <= len(self.body):
            length, cid, control = struct.unpack_from(">LBB", self.body, offset)
            items.append((cid, control, self.body[offset + 6:offset + 4 + length]))
            offset += 4 + length
        return items


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def read_pdu(sock: socket.socket, timeout_s: float = 10.0) -> Pdu:
    """The next PDU; TimeoutError or ConnectionError when none comes."""
    deadline = time.monotonic() + timeout_s
    header = _recv_exactly(sock, 6, deadline)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return Pdu(pdu_type, _recv_exactly(sock, length, deadline))


def wait_closed(sock: socket.socket, timeout_s: float) -> bool:
    """True when the peer closes the connection (EOF or reset) within `timeout_s`; data is drained."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def connect(port: int, host: str = "127.0.0.1", source: str | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10,
                                    source_address=(source, 0) if source else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(port: int, calling: str = "STORESCU", called: str = "MAMMO_NODE",
              contexts: list[tuple[int, str, list[str]]] | None = None,
              timeout_s: float = 10.0) -> tuple[socket.socket, Pdu]:
    """Connect and request an association; returns the socket and the AC/RJ/ABORT answer."""
    sock = connect(port)
    sock.sendall(associate_rq(calling, called, contexts))
    return sock, read_pdu(sock, timeout_s)


def echo_on(sock: socket.socket, context_id: int = 1, message_id: int = 1,
            timeout_s: float = 10.0) -> int | None:
    """C-ECHO on an established association; the response status."""
    sock.sendall(p_data([(context_id, 0x03, c_echo_rq(message_id))]))
    answer = read_pdu(sock, timeout_s)
    assert answer.type == P_DATA_TF, f"expected P-DATA-TF, got 0x{answer.type:02X}"
    command = b"".join(data for _, control, data in answer.pdvs() if control & 0x01)
    return command_status(command)


def release(sock: socket.socket, timeout_s: float = 10.0) -> bool:
    sock.sendall(release_rq())
    try:
        return read_pdu(sock, timeout_s).type == A_RELEASE_RP
    finally:
        sock.close()


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


# --- a node under test: the listener alone, in this process, on a free port -------------------
@contextmanager
def running_listener(settings: Settings) -> Iterator[StoreSCP]:
    scp = StoreSCP(settings, Spool(settings.spool.dir).ensure(), AssociationTracker())
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


def echoscu(port: int, calling: str = "STORESCU", called: str = "MAMMO_NODE",
            timeout_s: int = 10) -> subprocess.CompletedProcess[str]:
    """dcmtk's echoscu, the everyday C-ECHO: the node must still answer after every fault."""
    return subprocess.run(
        [find_binary("echoscu"), "-aet", calling, "-aec", called, "-to", str(timeout_s),
         "-ta", str(timeout_s), "-td", str(timeout_s), "127.0.0.1", str(port)],
        capture_output=True, text=True, check=False, timeout=timeout_s * 4,
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def reset_peak_rss() -> bool:
    """Reset VmHWM of this process (Linux clear_refs 5); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line")


def associate_ac(calling: str, called: str, contexts: list[tuple[int, str]],
                 max_pdu_bytes: int = 16384) -> bytes:
    """A-ASSOCIATE-AC accepting `contexts` as (context id, transfer syntax)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += b"\x00" * 32 + _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, syntax in contexts:
        body += _item(0x21, struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x40, syntax.encode()))
    user = _item(0x51, struct.pack(">L", max_pdu_bytes)) + _item(0x52, IMPLEMENTATION_UID.encode())
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_AC, body)

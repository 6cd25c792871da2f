"""The PDU guard's rules (PS3.8): how much a peer may send us, and how long it may take.

Pure protocol arithmetic on sockets and bytes, no pynetdicom: `read_pdu` reads one PDU whole
within a deadline after checking its announced length against the cap for its type, and
`MessageMeter` counts the P-DATA fragments of each DIMSE message against the per-message caps.
node/pynetdicom_internals.py plugs them into pynetdicom's DUL (`GuardedDUL`); a violation there
becomes an A-ABORT.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

# PS3.8 9.3: A-ASSOCIATE-RQ/AC carry a few contexts and user items; nothing honest comes near this.
MAX_ASSOCIATE_PDU_BYTES = 1024 * 1024
MAX_FIXED_PDU_BYTES = 1024  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes long
MAX_COMMAND_SET_BYTES = 64 * 1024  # a DIMSE command set is a few hundred bytes
# A data set of anything but a C-STORE-RQ is decoded in memory by pynetdicom: keep it small.
MAX_INLINE_DATA_SET_BYTES = 1024 * 1024
C_STORE_RQ_COMMAND_FIELD = 0x0001
P_DATA_TF = 0x04
PDU_HEADER_BYTES = 6


@dataclass(frozen=True)
class WireLimits:
    """What a peer may send us on one association."""

    max_pdata_pdu_bytes: int  # the Maximum Length we announced (variable field of P-DATA-TF)
    max_message_bytes: int  # one C-STORE data set
    pdu_timeout_s: float  # a whole PDU (header and body) must arrive within this
    io_timeout_s: float  # any other blocking socket call (sending included)


class PeerClosed(Exception):
    """The peer closed the connection before a whole PDU arrived."""


class WireViolation(Exception):
    """The peer broke a limit; `reason` names which (it goes to the log and the audit trail)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """`size` bytes, fewer when the peer closes; TimeoutError when `deadline` passes first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise TimeoutError("PDU not complete in time")
        sock.settimeout(remaining_s)
        count = sock.recv_into(view[received:], min(size - received, 1 << 16))
        if count == 0:
            break
        received += count
    return bytes(view[:received])


def command_field(command_set: bytes) -> int | None:
    """CommandField (0000,0100) of an encoded command set (always Implicit VR Little Endian)."""
    offset = 0
    while offset + 8 <= len(command_set):
        group, element, length = struct.unpack_from("<HHI", command_set, offset)
        offset += 8
        if (group, element) == (0x0000, 0x0100) and length == 2 and offset + 2 <= len(command_set):
            return int(struct.unpack_from("<H", command_set, offset)[0])
        offset += length
    return None


def pdu_cap(pdu_type: int, limits: WireLimits) -> int | None:
    """The largest body a PDU of this type may announce; None for a type PS3.8 does not define."""
    if pdu_type in (0x01, 0x02):
        return MAX_ASSOCIATE_PDU_BYTES
    if pdu_type == P_DATA_TF:
        return limits.max_pdata_pdu_bytes
    if pdu_type in (0x03, 0x05, 0x06, 0x07):
        return MAX_FIXED_PDU_BYTES
    return None


class MessageMeter:
    """Counts the PDVs of each DIMSE message on one association against the per-message caps
    (PS3.8 E.2): a command set is small; a C-STORE data set may reach `max_message_bytes`, any
    other data set (decoded in memory) only MAX_INLINE_DATA_SET_BYTES."""

    def __init__(self, limits: WireLimits) -> None:
        self._limits = limits
        self._command = bytearray()
        self._data_set_bytes = 0
        self._data_set_cap = MAX_INLINE_DATA_SET_BYTES

    def count(self, pdu: bytes) -> str | None:
        """Account one P-DATA-TF PDU; the violation's reason, or None."""
        offset = PDU_HEADER_BYTES
        while offset + 6 <= len(pdu):
            item_length = int.from_bytes(pdu[offset:offset + 4], "big")
            if item_length < 2 or offset + 4 + item_length > len(pdu):
                return None  # malformed: the decoder refuses it
            control = pdu[offset + 5]
            size = item_length - 2
            if control & 0x01:  # command fragment
                if len(self._command) + size > MAX_COMMAND_SET_BYTES:
                    return "command_set_too_long"
                self._command += pdu[offset + 6:offset + 4 + item_length]
                if control & 0x02:
                    is_store = command_field(bytes(self._command)) == C_STORE_RQ_COMMAND_FIELD
                    self._data_set_cap = (
                        self._limits.max_message_bytes if is_store else MAX_INLINE_DATA_SET_BYTES
                    )
                    self._command = bytearray()
                    self._data_set_bytes = 0
            else:  # data set fragment
                self._data_set_bytes += size
                if self._data_set_bytes > self._data_set_cap:
                    return "message_too_long"
                if control & 0x02:
                    self._data_set_bytes = 0
            offset += 4 + item_length
        return None


def read_pdu(sock: socket.socket, limits: WireLimits, meter: MessageMeter) -> bytes:
    """One whole PDU (header and body) within `limits.pdu_timeout_s`, its length checked before
    its body is read. Raises WireViolation for a broken limit, PeerClosed when the peer closes,
    OSError when the socket fails. Leaves the socket's timeout to the caller."""
    deadline = time.monotonic() + limits.pdu_timeout_s
    try:
        header = recv_exactly(sock, PDU_HEADER_BYTES, deadline)
        if len(header) < PDU_HEADER_BYTES:
            raise PeerClosed()
        pdu_type, _, length = struct.unpack(">BBL", header)
        cap = pdu_cap(pdu_type, limits)
        if cap is None:
            raise WireViolation("pdu_type_unknown")
        if length > cap:
            raise WireViolation("pdu_too_long")
        body = recv_exactly(sock, length, deadline)
    except TimeoutError:
        raise WireViolation("pdu_incomplete_timeout") from None
    if len(body) < length:
        raise PeerClosed()  # closed mid-PDU
    data = header + body
    if pdu_type == P_DATA_TF:
        violation = meter.count(data)
        if violation is not None:
            raise WireViolation(violation)
    return data

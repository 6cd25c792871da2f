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
COMMAND_FIELD_ELEMENT = 0x0100  # (0000,0100) CommandField
DATA_SET_TYPE_ELEMENT = 0x0800  # (0000,0800) CommandDataSetType
NO_DATA_SET = 0x0101  # PS3.7 E.1-1: the value of CommandDataSetType meaning "no data set"
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


def command_elements(command_set: bytes) -> dict[int, bytes] | None:
    """The elements of an encoded command set (always Implicit VR Little Endian, group 0000) by
    element number; None when it is malformed: cut inside an element, another group, or an
    element twice (two readers would disagree on which one counts)."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(command_set):
        if offset + 8 > len(command_set):
            return None
        group, element, length = struct.unpack_from("<HHI", command_set, offset)
        offset += 8
        if group != 0x0000 or element in elements or offset + length > len(command_set):
            return None
        elements[element] = command_set[offset:offset + length]
        offset += length
    return elements


def _us(value: bytes | None) -> int | None:
    return int(struct.unpack("<H", value)[0]) if value is not None and len(value) == 2 else None


def command_field(command_set: bytes) -> int | None:
    """CommandField (0000,0100) of an encoded command set; None when absent or malformed."""
    elements = command_elements(command_set)
    return None if elements is None else _us(elements.get(COMMAND_FIELD_ELEMENT))


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
    """Follows the DIMSE messages of one association fragment by fragment (PS3.8 E.2) and
    refuses any fragment that has no place in a message, whatever order the peer sends them in.

    A message is a command set, then a data set when the command announces one. A command set
    is small; a C-STORE data set (written to a file as it arrives) may reach `max_message_bytes`,
    any other data set (held in memory by pynetdicom) only MAX_INLINE_DATA_SET_BYTES. A data set
    fragment without a command that announced a data set, a command fragment in the middle of a
    data set, and a command set that cannot be read unambiguously are violations: pynetdicom
    would otherwise buffer such fragments in memory with no bound.
    """

    def __init__(self, limits: WireLimits) -> None:
        self._limits = limits
        self._command = bytearray()
        self._data_set_bytes = 0
        self._data_set_cap: int | None = None  # None: no data set expected, a command must come

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
                violation = self._command_fragment(pdu[offset + 6:offset + 4 + item_length],
                                                   last=bool(control & 0x02))
            else:  # data set fragment
                violation = self._data_set_fragment(size, last=bool(control & 0x02))
            if violation is not None:
                return violation
            offset += 4 + item_length
        return None

    def _command_fragment(self, fragment: bytes, last: bool) -> str | None:
        if self._data_set_cap is not None:
            return "command_during_data_set"
        if len(self._command) + len(fragment) > MAX_COMMAND_SET_BYTES:
            return "command_set_too_long"
        self._command += fragment
        if not last:
            return None
        elements = command_elements(bytes(self._command))
        self._command = bytearray()
        if elements is None or _us(elements.get(COMMAND_FIELD_ELEMENT)) is None:
            return "command_set_malformed"
        if _us(elements.get(DATA_SET_TYPE_ELEMENT)) == NO_DATA_SET:
            return None  # the message is complete: the next fragment must start a command
        is_store = _us(elements.get(COMMAND_FIELD_ELEMENT)) == C_STORE_RQ_COMMAND_FIELD
        self._data_set_cap = (
            self._limits.max_message_bytes if is_store else MAX_INLINE_DATA_SET_BYTES
        )
        self._data_set_bytes = 0
        return None

    def _data_set_fragment(self, size: int, last: bool) -> str | None:
        if self._data_set_cap is None:
            return "data_set_without_command"
        self._data_set_bytes += size
        if self._data_set_bytes > self._data_set_cap:
            return "message_too_long"
        if last:
            self._data_set_cap = None
        return None


A_ASSOCIATE_RQ = 0x01
ASSOCIATE_ITEMS_OFFSET = PDU_HEADER_BYTES + 68  # version, reserved, called AE, calling AE, reserved
PRESENTATION_CONTEXT_RQ_ITEM = 0x20


@dataclass(frozen=True)
class AssociateRequestSummary:
    """What admission needs of an A-ASSOCIATE-RQ, read from its bytes without decoding it."""

    called_ae: str
    calling_ae: str
    presentation_contexts: int


def _ae_title(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip(" \x00")


def summarise_associate_request(pdu: bytes) -> AssociateRequestSummary | None:
    """AE titles and the number of presentation context items of an A-ASSOCIATE-RQ (PS3.8
    9.3.2); None when the bytes are not one. A walk over item headers: costs microseconds where
    decoding 10,000 contexts costs a large fraction of a second of CPU."""
    if len(pdu) < ASSOCIATE_ITEMS_OFFSET or pdu[0] != A_ASSOCIATE_RQ:
        return None
    contexts = 0
    offset = ASSOCIATE_ITEMS_OFFSET
    while offset + 4 <= len(pdu):
        contexts += pdu[offset] == PRESENTATION_CONTEXT_RQ_ITEM
        offset += 4 + int.from_bytes(pdu[offset + 2:offset + 4], "big")
    return AssociateRequestSummary(called_ae=_ae_title(pdu[10:26]), calling_ae=_ae_title(pdu[26:42]),
                                   presentation_contexts=contexts)


def without_presentation_contexts(pdu: bytes) -> bytes:
    """The same A-ASSOCIATE-RQ with its presentation context items dropped (header length fixed):
    a request that will be rejected anyway is decoded at the cost of its few other items."""
    kept = bytearray(pdu[PDU_HEADER_BYTES:ASSOCIATE_ITEMS_OFFSET])
    offset = ASSOCIATE_ITEMS_OFFSET
    while offset + 4 <= len(pdu):
        end = offset + 4 + int.from_bytes(pdu[offset + 2:offset + 4], "big")
        if pdu[offset] != PRESENTATION_CONTEXT_RQ_ITEM:
            kept += pdu[offset:end]
        offset = end
    return struct.pack(">BBL", pdu[0], pdu[1], len(kept)) + bytes(kept)


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

"""The DICOM listener: association admission, C-ECHO and C-STORE into the spool.

The C-STORE handler validates a few header tags, moves the received file into the spool, appends
a manifest line and returns a status. Nothing else happens on the association thread.
"""

from __future__ import annotations

import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node import validate
from node.audit import open_audit
from node.completion import AssociationTracker
from node.logs import get_logger
from node.receive import SpoolingDIMSE, disk_rejection, free_bytes, refusal_of
from node.settings import Settings
from node.spool import InstanceEntry, Spool, hash_key
from node.tls import describe_tls_error, server_context
from node.uids import is_valid_uid

log = get_logger("node.scp")

VERIFICATION = "1.2.840.10008.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
STORAGE_SOP_CLASSES = (MG_FOR_PRESENTATION, MG_FOR_PROCESSING, BREAST_TOMOSYNTHESIS)

# Listed explicitly: never Deflated (inflate bombs) nor Big Endian (retired).
ACCEPTED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

# C-STORE statuses we answer (PS3.4 B.2.3 and GG.4).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_INVALID_UID = 0xC001

# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4.
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, provider (presentation)

LISTEN_BACKLOG = 256  # TCP connections waiting for accept(); the stock 5 drops bursts of SYNs

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
]


def association_id(assoc: Any) -> str:
    """A short id per association for logs and the manifest (set once, on first use)."""
    value = getattr(assoc, "mammo_association_id", None)
    if value is None:
        value = uuid.uuid4().hex[:12]
        assoc.mammo_association_id = value
    return str(value)


def admission_rejection(settings: Settings, calling_ae: str, called_ae: str, host: str) -> tuple[
    tuple[int, int, int], str
] | None:
    """Why an association request must be rejected, or None to admit it (pure)."""
    if called_ae.strip() != settings.node.ae_title:
        return REJECT_CALLED_AE_NOT_RECOGNISED, "called_ae_title_not_recognised"
    calling = calling_ae.strip()
    known = [c for c in settings.allowed_callers if c.ae_title == calling]
    if not known:
        return REJECT_CALLING_AE_NOT_RECOGNISED, "calling_ae_title_not_recognised"
    if not any(c.host is None or c.host == host for c in known):
        return REJECT_CALLING_AE_NOT_RECOGNISED, "calling_host_not_allowed"
    return None


# --- the wire: bounded PDUs and messages, timeouts on every read ------------------------------
# PS3.8 9.3: A-ASSOCIATE-RQ/AC carry a few contexts and user items; nothing honest comes near this.
MAX_ASSOCIATE_PDU_BYTES = 1024 * 1024
MAX_FIXED_PDU_BYTES = 1024  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are 4 bytes long
MAX_COMMAND_SET_BYTES = 64 * 1024  # a DIMSE command set is a few hundred bytes
# A data set of anything but a C-STORE-RQ is decoded in memory by pynetdicom: keep it small.
MAX_INLINE_DATA_SET_BYTES = 1024 * 1024
C_STORE_RQ_COMMAND_FIELD = 0x0001
NEGOTIATION_STATES = ("Sta1", "Sta2", "Sta3", "Sta4", "Sta5")  # PS3.8 9.2: before Sta6


@dataclass(frozen=True)
class WireLimits:
    """What a peer may send us on one association."""

    max_pdata_pdu_bytes: int  # the Maximum Length we announced (variable field of P-DATA-TF)
    max_message_bytes: int  # one C-STORE data set
    pdu_timeout_s: float  # a whole PDU (header and body) must arrive within this
    io_timeout_s: float  # any other blocking socket call (sending included)


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
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


def _command_field(command_set: bytes) -> int | None:
    """CommandField (0000,0100) of an encoded command set (always Implicit VR Little Endian)."""
    offset = 0
    while offset + 8 <= len(command_set):
        group, element, length = struct.unpack_from("<HHI", command_set, offset)
        offset += 8
        if (group, element) == (0x0000, 0x0100) and length == 2 and offset + 2 <= len(command_set):
            return int(struct.unpack_from("<H", command_set, offset)[0])
        offset += length
    return None


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with a PDU reader that cannot be made to wait or allocate without bound.

    Stock `_read_pdu_data` trusts the 4-byte PDU length (it reads whatever the peer announces)
    and blocks in `recv` with no timeout, so a half-sent PDU holds the association forever. Here
    each PDU must arrive whole within `pdu_timeout_s`; its announced length is checked against
    the limit for its type before the body is read; P-DATA fragments are counted per message.
    A violation raises Evt19 (invalid PDU): the state machine sends A-ABORT (PS3.8 AA-1/AA-8)
    and the connection is closed without reading what the peer still sends.

    Installed on an existing association by `guard_association` (instance class swap), so the
    library stays unmodified.
    """

    mammo_limits: WireLimits
    mammo_violation: str | None
    mammo_on_violation: Callable[[Any, str], None] | None
    _mammo_command: bytearray
    _mammo_data_set_bytes: int
    _mammo_data_set_cap: int

    def _read_pdu_data(self) -> None:
        assoc_socket = cast(AssociationSocket, self.socket)
        if self.mammo_violation is not None:
            # Nothing more is read from this peer. Once the A-ABORT is out (Sta13) the
            # connection is closed; until then the queued Evt19 still has to send it.
            if self.state_machine.current_state == "Sta13":
                assoc_socket.close()
            return
        sock = assoc_socket.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return
        limits = self.mammo_limits
        # Busy reading is not idle: the PDU deadline, not the idle timer, ends a stalled read.
        self._idle_timer.restart()
        deadline = time.monotonic() + limits.pdu_timeout_s
        try:
            header = _recv_exactly(sock, 6, deadline)
            if len(header) < 6:
                self.event_queue.put("Evt17")  # the peer closed the connection
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            cap = self._mammo_pdu_cap(pdu_type)
            if cap is None:
                self._mammo_abort("pdu_type_unknown")
                return
            if length > cap:
                self._mammo_abort("pdu_too_long")
                return
            body = _recv_exactly(sock, length, deadline)
        except TimeoutError:
            self._mammo_abort("pdu_incomplete_timeout")
            return
        except OSError:
            self.event_queue.put("Evt17")
            return
        finally:
            if assoc_socket.socket is not None:
                try:
                    sock.settimeout(limits.io_timeout_s)
                except OSError:
                    pass
        if len(body) < length:
            self.event_queue.put("Evt17")  # closed mid-PDU
            return
        data = header + body
        if pdu_type == 0x04:
            violation = self._mammo_count_fragments(data)
            if violation is not None:
                self._mammo_abort(violation)
                return
        try:
            pdu, event = self._decode_pdu(bytearray(data))
        except Exception:  # a peer's malformed bytes: Evt19, as the stock reader does
            self._mammo_abort("pdu_undecodable")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _process_recv_primitive(self) -> bool:
        # An abort requested locally (e.g. the idle timer) while our own A-ABORT is already out
        # (Sta13) has nothing left to do; stock pynetdicom raises InvalidEventError and the
        # DUL thread dies.
        if self.state_machine.current_state == "Sta13":
            try:
                primitive = self.to_provider_queue.queue[0]
            except IndexError:
                primitive = None
            if isinstance(primitive, A_ABORT | A_P_ABORT):
                self.to_provider_queue.get(False)
                return False
        return super()._process_recv_primitive()

    def _mammo_pdu_cap(self, pdu_type: int) -> int | None:
        if pdu_type in (0x01, 0x02):
            return MAX_ASSOCIATE_PDU_BYTES
        if pdu_type == 0x04:
            return self.mammo_limits.max_pdata_pdu_bytes
        if pdu_type in (0x03, 0x05, 0x06, 0x07):
            return MAX_FIXED_PDU_BYTES
        return None

    def _mammo_count_fragments(self, pdu: bytes) -> str | None:
        """Account the PDVs of one P-DATA-TF against the per-message caps (PS3.8 E.2)."""
        offset = 6
        while offset + 6 <= len(pdu):
            item_length = int.from_bytes(pdu[offset:offset + 4], "big")
            if item_length < 2 or offset + 4 + item_length > len(pdu):
                return None  # malformed: the decoder refuses it
            control = pdu[offset + 5]
            size = item_length - 2
            if control & 0x01:  # command fragment
                if len(self._mammo_command) + size > MAX_COMMAND_SET_BYTES:
                    return "command_set_too_long"
                self._mammo_command += pdu[offset + 6:offset + 4 + item_length]
                if control & 0x02:
                    is_store = _command_field(bytes(self._mammo_command)) == C_STORE_RQ_COMMAND_FIELD
                    self._mammo_data_set_cap = (
                        self.mammo_limits.max_message_bytes if is_store else MAX_INLINE_DATA_SET_BYTES
                    )
                    self._mammo_command = bytearray()
                    self._mammo_data_set_bytes = 0
            else:  # data set fragment
                self._mammo_data_set_bytes += size
                if self._mammo_data_set_bytes > self._mammo_data_set_cap:
                    return "message_too_long"
                if control & 0x02:
                    self._mammo_data_set_bytes = 0
            offset += 4 + item_length
        return None

    def _mammo_abort(self, reason: str) -> None:
        self.mammo_violation = reason
        if self.mammo_on_violation is not None:
            try:
                self.mammo_on_violation(self.assoc, reason)
            except Exception:  # reporting must never keep the abort from happening
                log.exception("abort_report_failed")
        self.event_queue.put("Evt19")  # invalid PDU -> A-ABORT (AA-1 or AA-8)


def guard_association(assoc: Any, limits: WireLimits,
                      on_violation: Callable[[Any, str], None] | None = None) -> None:
    """Give an association (acceptor or requestor) the guarded PDU reader."""
    dul = assoc.dul
    dul.__class__ = GuardedDUL
    dul.mammo_limits = limits
    dul.mammo_violation = None
    dul.mammo_on_violation = on_violation
    dul._mammo_command = bytearray()
    dul._mammo_data_set_bytes = 0
    dul._mammo_data_set_cap = MAX_INLINE_DATA_SET_BYTES


def discard_partial_receive(assoc: Any) -> None:
    """Delete the temporary file of a C-STORE still being received when the association ended."""
    message = getattr(assoc.dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    try:
        handle.close()
    except OSError:
        pass
    Path(handle.name).unlink(missing_ok=True)


class PendingConnections:
    """Connections that have not sent an A-ASSOCIATE-RQ yet, oldest first, at most `limit`.

    Each one costs three threads until the ACSE timeout; a flood of silent connections must not
    exhaust them. Over the limit the *oldest* is shut down (not the newcomer), so a real client
    arriving during a flood still gets in.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sockets: dict[int, tuple[socket.socket, str]] = {}  # insertion order = age
        self._evicted: set[int] = set()  # tokens shut down by us, until their handler leaves
        self._lock = threading.Lock()
        self._next = 0

    def __len__(self) -> int:
        return len(self._sockets)

    def enter(self, sock: socket.socket, host: str) -> tuple[int, list[str]]:
        """Register a new connection; returns its token and the hosts of those evicted for it."""
        evicted: list[tuple[socket.socket, str]] = []
        with self._lock:
            while len(self._sockets) >= self.limit:
                oldest = next(iter(self._sockets))
                evicted.append(self._sockets.pop(oldest))
                self._evicted.add(oldest)
            self._next += 1
            self._sockets[self._next] = (sock, host)
            token = self._next
        for victim, _ in evicted:
            try:  # the base class method: never touch an SSL object another thread is using
                socket.socket.shutdown(victim, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        return token, [host for _, host in evicted]

    def update(self, token: int, sock: socket.socket) -> None:
        with self._lock:
            if token in self._sockets:
                self._sockets[token] = (sock, self._sockets[token][1])

    def was_evicted(self, token: int) -> bool:
        with self._lock:
            return token in self._evicted

    def leave(self, token: int | None) -> None:
        if token is None:
            return
        with self._lock:
            self._sockets.pop(token, None)
            self._evicted.discard(token)


class AssociationLimiter:
    """Counts admitted associations; beyond the limit a request is rejected as transient."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def acquire(self, assoc: Any) -> bool:
        with self._lock:
            if self._active >= self.limit:
                return False
            self._active += 1
            assoc.mammo_holds_slot = True
            return True

    def release(self, assoc: Any) -> None:
        with self._lock:
            if getattr(assoc, "mammo_holds_slot", False):
                assoc.mammo_holds_slot = False
                self._active -= 1


class _AdmissionACSE(ACSE):
    """pynetdicom's ACSE with our admission rule in front: AE title *and* host allow-list, then
    the association limit (rejected-transient, local-limit-exceeded), each refusal logged once
    and audited."""

    settings: Settings
    scp: StoreSCP

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        host = self.assoc.requestor.address
        self.scp.pending.leave(getattr(self.assoc, "mammo_pending_token", None))
        decision = admission_rejection(
            self.settings, str(request.calling_ae_title), str(request.called_ae_title), host
        )
        if decision is None:  # below the disk watermark: storage is refused as transient
            syntaxes = [str(cx.abstract_syntax) for cx in request.presentation_context_definition_list]
            full = disk_rejection(free_bytes(self.settings.spool.dir),
                                  self.settings.spool.min_free_bytes, syntaxes)
            decision = None if full is None else (full, "disk_below_watermark")
        if decision is None and not self.scp.limiter.acquire(self.assoc):
            decision = (REJECT_LOCAL_LIMIT_EXCEEDED, "too_many_associations")
        if decision is None:
            super()._negotiate_as_acceptor()
            if not self.assoc.is_established:
                self.scp.limiter.release(self.assoc)
            return
        (result, source, reason), why = decision
        self.scp.record_rejection(
            why,
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=str(request.called_ae_title).strip(),
            host=host,
            result=f"0x{result:02X}",
            source=f"0x{source:02X}",
            diagnostic=f"0x{reason:02X}",
        )
        self.send_reject(result, source, reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _admission_request_handler(scp: StoreSCP) -> type[RequestHandler]:
    """The per-connection handler: TLS handshake off the accept thread, bounded reads, admission."""
    listener, settings = scp, scp.settings
    acse_class = type("AdmissionACSE", (_AdmissionACSE,), {"settings": settings, "scp": scp})
    node = settings.node
    limits = WireLimits(
        max_pdata_pdu_bytes=node.max_pdu_bytes,
        max_message_bytes=node.max_message_bytes,
        pdu_timeout_s=node.network_timeout_s,
        io_timeout_s=node.network_timeout_s,
    )

    class AdmissionRequestHandler(RequestHandler):
        def handle(self) -> None:
            host = str(self.client_address[0])
            token, evicted = listener.pending.enter(cast(socket.socket, self.request), host)
            for evicted_host in evicted:
                listener.record_rejection("too_many_pending_connections", host=evicted_host,
                                          action="closed")
            try:
                self._serve(host, token)
            finally:
                listener.pending.leave(token)

        def _serve(self, host: str, token: int) -> None:
            if listener.ssl_context is not None:
                secured = self._tls_handshake(listener.ssl_context, host, token)
                if secured is None:
                    return
                self.request = secured
            cast(socket.socket, self.request).settimeout(node.network_timeout_s)
            assoc = self._create_association()
            assoc.mammo_pending_token = token
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            try:
                assoc.join()  # this thread holds the association's slot until it is over
            finally:
                listener.limiter.release(assoc)
                discard_partial_receive(assoc)

        def _tls_handshake(self, context: ssl.SSLContext, host: str,
                           token: int) -> ssl.SSLSocket | None:
            """Handshake here, on this connection's thread, within the ACSE timeout."""
            sock = cast(socket.socket, self.request)
            try:
                sock.settimeout(node.acse_timeout_s)
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                listener.pending.update(token, sock)
                sock.do_handshake()
            except (OSError, ValueError) as error:
                if not listener.pending.was_evicted(token):  # already logged as evicted
                    listener.record_rejection("tls_handshake_failed", host=host,
                                              detail=describe_tls_error(error))
                sock.close()  # the TLS socket once wrapped (closing it closes the raw one)
                return None
            return cast(ssl.SSLSocket, sock)

        def _create_association(self) -> Any:
            assoc = super()._create_association()
            assoc.acse = acse_class(assoc)
            # Full disk mid-receive -> 0xA700 instead of a dead association (node/receive.py).
            assoc.dimse = SpoolingDIMSE(assoc, settings.spool.dir, settings.spool.min_free_bytes)
            guard_association(assoc, limits, listener.record_abort)
            return assoc

    return AdmissionRequestHandler


class _ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a deeper accept backlog and daemon connection threads.

    TLS is never done here (the stock server handshakes inside the accept loop, where one idle
    connection stalls every other): the handler does it on the connection's own thread.
    """

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True


class StoreSCP:
    """The node's listener. Non-blocking: `start()` returns, `stop()` shuts down from any thread."""

    def __init__(self, settings: Settings, spool: Spool, tracker: AssociationTracker) -> None:
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self.audit = open_audit(settings, "listener")
        self.limiter = AssociationLimiter(settings.node.max_associations)
        self.pending = PendingConnections(settings.node.max_pending_connections)
        # Built here so a certificate that cannot be loaded stops the node at startup.
        self.ssl_context: ssl.SSLContext | None = (
            server_context(settings.node.tls) if settings.node.tls is not None else None
        )
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    def build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_bytes
        # Our AssociationLimiter enforces node.max_associations on admitted associations only;
        # pynetdicom's own count includes connections that have not even sent a request yet.
        ae.maximum_associations = 100_000
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound (host, port)."""
        # Received data sets go straight to files under the spool's tmp/ (same filesystem, so the
        # move into incoming/ is a rename). This process exists to serve, so the global is ours.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        self.spool.tmp_dir.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(self.spool.tmp_dir)
        ae = self.build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
        ]
        address = (self.settings.node.bind_address, self.settings.node.port)
        server = _ListenerServer(
            ae,
            address,
            self.settings.node.ae_title,
            ae.supported_contexts,
            evt_handlers=handlers,
            request_handler=_admission_request_handler(self),
        )
        ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-listener")
        self._thread.daemon = True
        self._thread.start()
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # --- handlers ---------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def handle_accepted(self, event: Any) -> None:
        assoc = event.assoc
        fields = {
            "association_id": association_id(assoc),
            "calling_ae": str(assoc.requestor.ae_title).strip(),
            "called_ae": str(assoc.acceptor.ae_title).strip(),
            "host": assoc.requestor.address,
            "tls": self.ssl_context is not None,
        }
        log.info("association_accepted", **fields)
        self.audit.record("association_accepted", **fields)

    def record_rejection(self, reason: str, **fields: Any) -> None:
        """One log line and one audit record for a refused association or connection."""
        log.warning("association_rejected", reason=reason, **fields)
        self.audit.record("association_rejected", reason=reason, **fields)

    def record_abort(self, assoc: Any, reason: str) -> None:
        """Called by the PDU guard when it aborts: one log line, one audit record (no PHI),
        `association_aborted` with the stage it happened at (negotiation or established)."""
        established = assoc.dul.state_machine.current_state not in NEGOTIATION_STATES
        calling = assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else ""
        fields = {
            "association_id": association_id(assoc),
            "calling_ae": str(calling or "").strip(),
            "host": assoc.requestor.address,
            "stage": "established" if established else "negotiation",
        }
        log.warning("association_aborted", reason=reason, **fields)
        self.audit.record("association_aborted", reason=reason, action="aborted", **fields)

    def handle_released(self, event: Any) -> None:
        self.tracker.close(association_id(event.assoc))

    def handle_aborted(self, event: Any) -> None:
        assoc = event.assoc
        if getattr(assoc.dul, "mammo_violation", None) is None:  # our guard logged its own
            reason = "network_timeout" if assoc.dul.idle_timer_expired() else "peer_or_network"
            log.warning("association_aborted", association_id=association_id(assoc), reason=reason)
        self.tracker.close(association_id(assoc))

    def handle_conn_close(self, event: Any) -> None:
        self.tracker.close(association_id(event.assoc))

    def handle_store(self, event: Any) -> int:
        started = time.monotonic()
        assoc_id = association_id(event.assoc)
        request = event.request
        path = Path(event.dataset_path)
        command_sop_uid = str(request.AffectedSOPInstanceUID)
        command_sop_class = str(request.AffectedSOPClassUID)
        refusal = refusal_of(request)  # the data set was dropped while receiving (disk)
        if refusal is not None:
            status, reason, entry = STATUS_OUT_OF_RESOURCES, refusal, None
        else:
            status, reason, entry = self._admit_instance(path, command_sop_uid, command_sop_class,
                                                         assoc_id)
        if status == STATUS_SUCCESS and entry is not None:
            try:
                self.spool.add_instance(path, entry)
            except OSError as error:
                status, reason = STATUS_OUT_OF_RESOURCES, f"write_failed:{error.strerror or error}"
        if status != STATUS_SUCCESS or entry is None:
            path.unlink(missing_ok=True)
            loggable_sop_uid = command_sop_uid if is_valid_uid(command_sop_uid) else "(invalid)"
            log.warning(
                "instance_rejected",
                association_id=assoc_id,
                status=f"0x{status:04X}",
                reason=reason,
                sop_class_uid=command_sop_class,
                sop_uid=loggable_sop_uid,
            )
            self.audit.record(
                "instance_rejected",
                association=assoc_id,
                sop_class_uid=command_sop_class if is_valid_uid(command_sop_class) else "(invalid)",
                sop_instance_uid=loggable_sop_uid,
                status=f"0x{status:04X}",
                reason=reason,
            )
            return status
        self.tracker.add(assoc_id, hash_key(entry.study_uid))
        log.info(
            "instance_received",
            association_id=assoc_id,
            study_uid=entry.study_uid,
            sop_uid=entry.sop_uid,
            sop_class_uid=entry.sop_class_uid,
            view=entry.view_key,
            size_bytes=entry.size_bytes,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        self.audit.record(
            "instance_received",
            association=assoc_id,
            sop_class_uid=entry.sop_class_uid,
            sop_instance_uid=entry.sop_uid,
            study_uid=entry.study_uid,
            status=f"0x{STATUS_SUCCESS:04X}",
        )
        return STATUS_SUCCESS

    def _admit_instance(
        self, path: Path, command_sop_uid: str, command_sop_class: str, assoc_id: str
    ) -> tuple[int, str, InstanceEntry | None]:
        """Check one received file; (status, reason, manifest entry when accepted)."""
        if self.spool.free_bytes() < self.settings.spool.min_free_bytes:
            return STATUS_OUT_OF_RESOURCES, "disk_below_watermark", None
        try:
            size_bytes = path.stat().st_size
            header, extent = validate.read_header(path, tuple(_HEADER_TAGS))
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
        except Exception as error:  # any parse failure of a peer's bytes is "cannot understand"
            return STATUS_CANNOT_UNDERSTAND, f"unreadable_dataset:{type(error).__name__}", None
        # UIDs, then image attributes against the pixel data received (node/validate.py).
        rejection = validate.check_instance(header, extent, size_bytes, command_sop_uid,
                                            command_sop_class)
        if rejection is not None:
            return rejection.status, rejection.reason, None
        uids = {name: str(header.get(name)) for name in validate.UID_KEYWORDS}
        laterality = str(header.get("ImageLaterality", "") or header.get("Laterality", "") or "")
        laterality = laterality.strip().upper()
        entry = InstanceEntry(
            sop_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            series_uid=uids["SeriesInstanceUID"],
            study_uid=uids["StudyInstanceUID"],
            transfer_syntax_uid=transfer_syntax,
            laterality=laterality if laterality in ("R", "L", "B") else "",
            view=str(header.get("ViewPosition", "") or "").strip().upper()[:16],
            file=hash_key(uids["SOPInstanceUID"]) + ".dcm",
            size_bytes=size_bytes,
            received_at=time.time(),
            association_id=assoc_id,
        )
        return STATUS_SUCCESS, "", entry

"""Every reach into pynetdicom beyond its public API, in one module.

The listener needs things pynetdicom 3.0.4 does not offer publicly: a PDU reader that cannot be
made to wait or allocate without bound, an admission rule in front of ACSE negotiation, a chunked
C-STORE receive that answers 0xA700 when the disk fills, TLS handshakes off the accept thread, a
deeper accept backlog. Each is an override of a private method, a class swap on a live object, a
private module global or an attribute hung on one of its objects. They are all here, so an
upgrade has one file to read; the other node modules use only the public names below.

Written for pynetdicom WRITTEN_FOR; `check_pynetdicom_version` (called by `StoreSCP.start`) fails
loudly on any other version. Before changing WRITTEN_FOR, re-run the fault tests that are this
module's contract (CONTRACT_FAULT_TESTS):

- tests/faults/test_protocol_abuse.py: GuardedDUL (`_read_pdu_data`, `_decode_pdu`, `_idle_timer`,
  `_recv_pdu`, `_process_recv_primitive`, the DUL class swap): oversized, never-ending,
  half-sent, trickled and unknown PDUs are aborted; a silent connection is closed.
- tests/faults/test_admission.py: GatedACSE (`_negotiate_as_acceptor`) and the request handler
  (`RequestHandler.handle`, `_create_association`): AE/host rules, association limit, pending
  connection cap.
- tests/faults/test_tls.py: the TLS handshake on the connection's own thread.
- tests/faults/test_disk_full.py: ChunkedStoreDIMSE (`DIMSEMessage._data_set_file`,
  `_config.STORE_RECV_CHUNKED_DATASET`): a full disk mid-receive answers 0xA700.
- tests/faults/test_hostile_datasets.py: chunked receive into the spool's tmp/ and the
  discarding of partial files (`discard_partial_receive`).
"""

from __future__ import annotations

import errno
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import pynetdicom
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.logs import get_logger
from node.vocabulary import AssociateRejection
from node.wire import (
    MessageMeter,
    PeerClosed,
    WireLimits,
    WireViolation,
    read_pdu,
)

log = get_logger("node.pynetdicom_internals")

WRITTEN_FOR = "3.0.4"
CONTRACT_FAULT_TESTS = (
    "tests/faults/test_protocol_abuse.py",
    "tests/faults/test_admission.py",
    "tests/faults/test_tls.py",
    "tests/faults/test_disk_full.py",
    "tests/faults/test_hostile_datasets.py",
)
LISTEN_BACKLOG = 256  # TCP connections waiting for accept(); the stock 5 drops bursts of SYNs
NEGOTIATION_STATES = ("Sta1", "Sta2", "Sta3", "Sta4", "Sta5")  # PS3.8 9.2: before Sta6


class PynetdicomVersionError(RuntimeError):
    """The installed pynetdicom is not the one this module was written and tested against."""


def check_pynetdicom_version(installed: str = pynetdicom.__version__) -> None:
    """Refuse to serve on a pynetdicom this module was not checked against."""
    if installed != WRITTEN_FOR:
        raise PynetdicomVersionError(
            f"pynetdicom {installed} is installed but node/pynetdicom_internals.py was written "
            f"for pynetdicom {WRITTEN_FOR} (it overrides private internals). Review that module "
            f"against {installed}, re-run its contract fault tests "
            f"({' '.join(CONTRACT_FAULT_TESTS)}), then update WRITTEN_FOR; or install "
            f"pynetdicom=={WRITTEN_FOR}."
        )


def enable_chunked_receive(tmp_dir: Path) -> None:
    """Received data sets go straight to files under `tmp_dir` (same filesystem as the spool, so
    the move into incoming/ is a rename); pynetdicom's own log handler stays quiet. These are
    process-wide globals: the serving process is ours."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp_dir)


# --- attributes we hang on pynetdicom's objects --------------------------------------------------
ASSOCIATION_ID_ATTRIBUTE = "mammo_association_id"


def association_tag(assoc: Association, make: Callable[[], str]) -> str:
    """A per-association id kept on the association itself, made on first use."""
    value = getattr(assoc, ASSOCIATION_ID_ATTRIBUTE, None)
    if value is None:
        value = make()
        setattr(assoc, ASSOCIATION_ID_ATTRIBUTE, value)
    return str(value)


def is_negotiating(assoc: Association) -> bool:
    """True before the association is established (PS3.8 states Sta1-Sta5)."""
    return assoc.dul.state_machine.current_state in NEGOTIATION_STATES


# --- DUL: the guarded PDU reader -----------------------------------------------------------------
WireViolationHandler = Callable[[Association, str], None]


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with a PDU reader that cannot be made to wait or allocate without bound.

    Stock `_read_pdu_data` trusts the 4-byte PDU length (it reads whatever the peer announces)
    and blocks in `recv` with no timeout, so a half-sent PDU holds the association forever. Here
    each PDU is read by node.wire.read_pdu: whole within `pdu_timeout_s`, its announced length
    checked against the limit for its type before the body is read, P-DATA fragments counted per
    message. A violation raises Evt19 (invalid PDU): the state machine sends A-ABORT (PS3.8
    AA-1/AA-8) and the connection is closed without reading what the peer still sends.

    Installed on an existing association by `guard_association` (instance class swap), so the
    library stays unmodified.
    """

    mammo_limits: WireLimits
    mammo_meter: MessageMeter
    mammo_violation: str | None
    mammo_on_violation: WireViolationHandler | None

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
        # Busy reading is not idle: the PDU deadline, not the idle timer, ends a stalled read.
        self._idle_timer.restart()
        try:
            data = read_pdu(sock, self.mammo_limits, self.mammo_meter)
        except WireViolation as violation:
            self._mammo_abort(violation.reason)
            return
        except (PeerClosed, OSError):
            self.event_queue.put("Evt17")  # the peer closed the connection, or it failed
            return
        finally:
            if assoc_socket.socket is not None:
                try:
                    sock.settimeout(self.mammo_limits.io_timeout_s)
                except OSError:
                    pass
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

    def _mammo_abort(self, reason: str) -> None:
        self.mammo_violation = reason
        if self.mammo_on_violation is not None:
            try:
                self.mammo_on_violation(self.assoc, reason)
            except Exception:  # reporting must never keep the abort from happening
                log.exception("abort_report_failed")
        self.event_queue.put("Evt19")  # invalid PDU -> A-ABORT (AA-1 or AA-8)


def guard_association(assoc: Association, limits: WireLimits,
                      on_violation: WireViolationHandler | None = None) -> None:
    """Give an association (acceptor or requestor) the guarded PDU reader."""
    dul = assoc.dul
    dul.__class__ = GuardedDUL
    guarded = cast(GuardedDUL, dul)
    guarded.mammo_limits = limits
    guarded.mammo_meter = MessageMeter(limits)
    guarded.mammo_violation = None
    guarded.mammo_on_violation = on_violation


def wire_violation(assoc: Association) -> str | None:
    """Why the PDU guard aborted this association, or None when it did not."""
    violation = getattr(assoc.dul, "mammo_violation", None)
    return None if violation is None else str(violation)


def bound_connect_socket(assoc: Association, timeout_s: float) -> None:
    """Give a requestor's freshly connected socket a timeout (connect() leaves it without)."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.settimeout(timeout_s)


# --- DIMSE: chunked C-STORE receive that can refuse ----------------------------------------------
class StoreReceivePolicy(Protocol):
    """What ChunkedStoreDIMSE asks the receive path (node/receive.py implements it)."""

    def refusal_before_writing(self) -> str | None:
        """Why a C-STORE data set that is about to be written must be refused, or None."""

    def receive_abandoned(self, reason: str, affected_sop_uid: object) -> None:
        """A C-STORE's data set was dropped mid-receive (for the log)."""


REFUSAL_ATTRIBUTE = "mammo_refusal"  # on a C-STORE primitive whose data set was not kept


def refusal_of(request: C_STORE) -> str | None:
    """Why the receive of this C-STORE was abandoned (the data set is gone), or None."""
    value = getattr(request, REFUSAL_ATTRIBUTE, None)
    return str(value) if value else None


def _ends_data_set(primitive: P_DATA) -> bool:
    """True when this P-DATA carries the last fragment of a message's data set."""
    for _context_id, data in primitive.presentation_data_value_list:
        if data and not data[0] & 1 and data[0] & 2:
            return True
    return False


class ChunkedStoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with a failing or refused chunked write turned into 0xA700.

    With `STORE_RECV_CHUNKED_DATASET`, pynetdicom 3.0.4 writes each incoming data set fragment to
    a temporary file from inside its DUL state machine (`DIMSEServiceProvider.receive_primitive`
    -> `DIMSEMessage.decode_msg` -> `NamedTemporaryFile.write`). A write that fails (ENOSPC,
    EDQUOT, EIO) raises out of `StateMachine.do_action`, which marks the DUL for death and
    re-raises; `DULServiceProvider.run_reactor` calls `do_action` outside its own try block, so
    the DUL thread dies with the exception. Nobody sends a C-STORE-RSP or an A-ABORT, nobody
    closes the socket, and the partial temporary file stays behind: the sender waits for a
    response that never comes.

    Here, when a write fails, or when the policy refuses a C-STORE's data set as it starts, the
    temporary file is deleted, the rest of that message's fragments are read and dropped, and the
    C-STORE goes to its handler marked refused (`refusal_of`), so the sender gets 0xA700 on an
    association that stays usable.
    """

    def __init__(self, assoc: Association, policy: StoreReceivePolicy) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._refusal: str | None = None  # set while the rest of a message is being dropped

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self._refusal is not None and self.message is not None:
            if _ends_data_set(primitive):
                self._deliver_refused()
            return
        writing_before = self.message is not None and self.message._data_set_file is not None
        try:
            super().receive_primitive(primitive)
        except OSError as error:
            if not isinstance(self.message, C_STORE_RQ):
                raise
            self._refuse(_errno_name(error))
            if _ends_data_set(primitive):
                self._deliver_refused()
            return
        message = self.message
        started_now = (
            message is not None and not writing_before and message._data_set_file is not None
        )
        if started_now:
            refusal = self._policy.refusal_before_writing()
            if refusal is not None:
                self._refuse(refusal)

    def _refuse(self, reason: str) -> None:
        """Delete what was written of the current C-STORE; drop the rest of its fragments."""
        message = self.message
        assert message is not None
        handle = message._data_set_file
        if handle is not None:
            try:
                handle.close()  # flushing the buffer may fail again on a full disk: the fd closes
            except OSError:
                pass
            Path(handle.name).unlink(missing_ok=True)
        self._refusal = reason
        self._policy.receive_abandoned(
            reason, message.command_set.get("AffectedSOPInstanceUID", ""))

    def _deliver_refused(self) -> None:
        """Queue the C-STORE for its handler, marked refused, exactly as a complete one would be."""
        message = self.message
        assert message is not None and self._refusal is not None
        request = message.message_to_primitive()
        setattr(request, REFUSAL_ATTRIBUTE, self._refusal)
        self.msg_queue.put((message.context_id, request))  # type: ignore[arg-type]
        self._refusal = None
        self.message = None


def _errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, type(error).__name__).lower()


def discard_partial_receive(assoc: Association) -> None:
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


# --- ACSE: admission in front of negotiation -----------------------------------------------------
class AssociationGate(Protocol):
    """Who may associate, asked once per connection (node/admission.py implements it)."""

    def admit(self, assoc: Association, request: A_ASSOCIATE) -> AssociateRejection | None:
        """The rejection to send, or None to negotiate (the gate may then hold a slot)."""

    def negotiation_failed(self, assoc: Association) -> None:
        """Negotiation ran but did not establish the association."""

    def association_ended(self, assoc: Association) -> None:
        """The association (or the connection) is over."""


class GatedACSE(ACSE):
    """pynetdicom's ACSE with the gate's admission rule in front of negotiation."""

    gate: AssociationGate

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        rejection = self.gate.admit(self.assoc, request)
        if rejection is None:
            super()._negotiate_as_acceptor()
            if not self.assoc.is_established:
                self.gate.negotiation_failed(self.assoc)
            return
        self.send_reject(*rejection)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


# --- the server: one thread per connection, TLS and admission on it ------------------------------
ServeAssociation = Callable[[socket.socket | ssl.SSLSocket, AssociationGate], None]


class ConnectionHost(Protocol):
    """What the listener (node/scp.py) supplies for each connection and association."""

    def serve_connection(self, sock: socket.socket, host: str,
                         serve_association: ServeAssociation) -> None:
        """Admit the connection (pending cap, TLS handshake), then call `serve_association` with
        the socket to speak DICOM on and the gate for its association; returns when it is over."""

    def prepare_association(self, assoc: Association) -> None:
        """Install what the association needs before it starts (guard, DIMSE provider)."""


def _request_handler(host: ConnectionHost) -> type[RequestHandler]:
    class ConnectionHandler(RequestHandler):
        """The per-connection thread: everything, TLS included, happens here, not on accept."""

        def handle(self) -> None:
            host.serve_connection(cast(socket.socket, self.request), str(self.client_address[0]),
                                  self._serve_association)

        def _serve_association(self, sock: socket.socket | ssl.SSLSocket,
                               gate: AssociationGate) -> None:
            self.request = sock
            assoc = self._create_association()
            acse = GatedACSE(assoc)
            acse.gate = gate
            assoc.acse = acse
            host.prepare_association(assoc)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            try:
                assoc.join()  # this thread holds the association's slot until it is over
            finally:
                gate.association_ended(assoc)
                discard_partial_receive(assoc)

    return ConnectionHandler


class _ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a deeper accept backlog and daemon connection threads.

    TLS is never done here (the stock server handshakes inside the accept loop, where one idle
    connection stalls every other): the connection handler does it on the connection's thread.
    """

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True


def start_listener(ae: AE, address: tuple[str, int], handlers: list[evt.EventHandlerType],
                   host: ConnectionHost) -> ThreadedAssociationServer:
    """Bind and serve `ae` in a background thread with the host's connection handling."""
    contexts: list[PresentationContext] = ae.supported_contexts
    server = _ListenerServer(
        ae,
        address,
        ae.ae_title,
        contexts,
        evt_handlers=handlers,
        request_handler=_request_handler(host),
    )
    ae._servers.append(server)  # so ae.shutdown() stops it too
    thread = threading.Thread(target=server.serve_forever, name="dicom-listener")
    thread.daemon = True
    thread.start()
    return server


def server_address(server: ThreadedAssociationServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return str(host), int(port)


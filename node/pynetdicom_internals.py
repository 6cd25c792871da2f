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
  discarding of partial files (`discard_partial_receive`); the data set fragments of a C-STORE
  written straight from the PDU, past the state machine (`GuardedDUL._mammo_write_data_set`:
  `_recv_pdu`, `_kill_thread`, `_run_loop_delay`, `DIMSEMessage._data_set_file`), which every
  large receive of tests/integration/test_receive.py and test_group_commit.py goes through.
- tests/faults/test_holes.py: the A-ASSOCIATE-RQ screened before decoding (`GuardedDUL`,
  `_read_pdu_data`), GuardedStateMachine (`StateMachine.do_action`), GuardedAssociation
  (`_serve_request`, `_abort_blocking`, `_abort_nonblocking`, the class swap), the files a
  message starts (`DIMSEMessage._data_set_path`, `dimse.message`, the DUL's `event_queue`),
  `Association.rejected_contexts`; every abort reported with its reason.
- tests/integration/test_send.py: a rejection read from the DUL's `to_user_queue` when
  pynetdicom's requestor missed it (`association_rejection`); the error a failed connect
  was caught with (`RequestorAE._create_socket`, `AssociationSocket._shutdown_socket`,
  `connect_error`); a reply the requestor's reactor would have taken from its sender
  (ReplyKeepingDIMSE: `DIMSEServiceProvider.get_msg`, `msg_queue`, `_reactor_checkpoint`, the
  class swap).
"""

from __future__ import annotations

import errno
import io
import select
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import pynetdicom
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from node.logs import get_logger
from node.vocabulary import AssociateRejection
from node.wire import (
    A_ASSOCIATE_RQ,
    MAX_INLINE_DATA_SET_BYTES,
    P_DATA_TF,
    PDU_HEADER_BYTES,
    AssociateRequestSummary,
    MessageMeter,
    PeerClosed,
    WireLimits,
    WireViolation,
    read_pdu,
    summarise_associate_request,
    without_presentation_contexts,
)

log = get_logger("node.pynetdicom_internals")

WRITTEN_FOR = "3.0.4"
CONTRACT_FAULT_TESTS = (
    "tests/faults/test_protocol_abuse.py",
    "tests/faults/test_admission.py",
    "tests/faults/test_tls.py",
    "tests/faults/test_disk_full.py",
    "tests/faults/test_hostile_datasets.py",
    "tests/faults/test_holes.py",
    "tests/integration/test_send.py",
)
LISTEN_BACKLOG = 256  # TCP connections waiting for accept(); the stock 5 drops bursts of SYNs


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
ESTABLISHED_ATTRIBUTE = "mammo_established"  # True once negotiation established it
CONTEXT_COUNT_ATTRIBUTE = "mammo_proposed_contexts"  # presentation contexts in the A-ASSOCIATE-RQ
LOCAL_ABORT_ATTRIBUTE = "mammo_local_abort"  # why pynetdicom itself aborted while serving
ABORT_REPORTED_ATTRIBUTE = "mammo_abort_reported"


def association_tag(assoc: Association, make: Callable[[], str]) -> str:
    """A per-association id kept on the association itself, made on first use."""
    value = getattr(assoc, ASSOCIATION_ID_ATTRIBUTE, None)
    if value is None:
        value = make()
        setattr(assoc, ASSOCIATION_ID_ATTRIBUTE, value)
    return str(value)


def is_negotiating(assoc: Association) -> bool:
    """True while the association has not (yet) been established; stays False once it was, so
    an abort reported after the end still says it happened on an established association."""
    return not getattr(assoc, ESTABLISHED_ATTRIBUTE, False) and not assoc.is_established


def proposed_context_count(assoc: Association) -> int | None:
    """How many presentation contexts the peer's A-ASSOCIATE-RQ carried (before any was dropped
    for a request refused unread); None before a request was read."""
    value = getattr(assoc, CONTEXT_COUNT_ATTRIBUTE, None)
    return None if value is None else int(value)


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
    mammo_violation: str | None  # why we aborted (wire, DIMSE or protocol state), once set
    mammo_peer_end: str | None  # "peer_aborted" or "connection_closed", as the reader saw it
    mammo_read_error: OSError | None  # what a read that ended the connection raised, if anything
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
        try:
            while True:
                data = self._mammo_read(sock)
                if data is None:
                    return
                if not self._mammo_write_data_set(data):
                    break
                # Fragments of a data set went straight to its file (no event for the state
                # machine): read on while the peer keeps sending and nothing waits to be sent.
                if not self._mammo_more_to_read(assoc_socket, sock):
                    return
        finally:
            if assoc_socket.socket is not None:  # read_pdu left its own deadline on the socket
                try:
                    sock.settimeout(self.mammo_limits.io_timeout_s)
                except OSError:
                    pass
        if data[0] == A_ASSOCIATE_RQ:
            data = self._mammo_screen_request(data)
        try:
            pdu, event = self._decode_pdu(bytearray(data))
        except Exception:  # a peer's malformed bytes: Evt19, as the stock reader does
            self._mammo_abort("pdu_undecodable")
            return
        if event == "Evt16":  # A-ABORT from the peer
            self.mammo_peer_end = "peer_aborted"
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _mammo_read(self, sock: socket.socket | ssl.SSLSocket) -> bytes | None:
        """The next PDU, or None when reading ended in an abort or a closed connection (its
        event is queued)."""
        # Busy reading is not idle: the PDU deadline, not the idle timer, ends a stalled read.
        self._idle_timer.restart()
        try:
            return read_pdu(sock, self.mammo_limits, self.mammo_meter)
        except WireViolation as violation:
            self._mammo_abort(violation.reason)
            return None
        except (PeerClosed, OSError) as error:
            self.mammo_peer_end = "connection_closed"
            if isinstance(error, OSError) and self.mammo_read_error is None:
                self.mammo_read_error = error
            self.event_queue.put("Evt17")  # the peer closed the connection, or it failed
            return None

    def _mammo_write_data_set(self, data: bytes) -> bool:
        """Write a P-DATA-TF of C-STORE data set fragments straight to the data set's file, when
        it holds nothing else (no command, not the last fragment) and nothing is waiting for the
        state machine; True when written. The stock path (Evt10, DT-2: decoded into items, a
        P-DATA primitive, pynetdicom's `decode_msg`) copies each fragment four times and costs
        more CPU than the write itself; what it does for such a PDU in Sta6 is exactly this
        write. Nothing in the node binds the events it would trigger (EVT_DATA_RECV,
        EVT_PDU_RECV, EVT_FSM_TRANSITION)."""
        if (data[0] != P_DATA_TF or self.state_machine.current_state != "Sta6"
                or not self.event_queue.empty() or not self._recv_pdu.empty()):
            return False
        dimse = self.assoc.dimse
        return isinstance(dimse, ChunkedStoreDIMSE) and dimse.write_data_set_fragments(data)

    def _mammo_more_to_read(self, assoc_socket: AssociationSocket,
                            sock: socket.socket | ssl.SSLSocket) -> bool:
        """True when the reactor has nothing else to do and a PDU is arriving: ready now, or
        within the reactor's own idle sleep (`_run_loop_delay`), which it would otherwise sleep
        in full before looking again."""
        if (self._kill_thread or not self.to_provider_queue.empty()
                or not self.event_queue.empty() or self.mammo_violation is not None):
            return False
        if assoc_socket.ready:
            return True
        try:
            select.select([sock], [], [], self._run_loop_delay)
        except (OSError, ValueError):
            return False
        return self.to_provider_queue.empty() and assoc_socket.ready

    def _mammo_screen_request(self, data: bytes) -> bytes:
        """Ask the gate about an A-ASSOCIATE-RQ from its bytes alone, before pynetdicom decodes
        its presentation contexts (~50 us each: 10,000 of them cost half a second of CPU). A
        request the gate will refuse (a stranger, too many contexts) is decoded without them;
        the gate then rejects it with its proper reason (GatedACSE)."""
        summary = summarise_associate_request(data)
        if summary is None:
            return data
        setattr(self.assoc, CONTEXT_COUNT_ATTRIBUTE, summary.presentation_contexts)
        gate = getattr(self.assoc.acse, "gate", None)
        if gate is not None and gate.refuses_unread(summary, self.assoc.requestor.address):
            return without_presentation_contexts(data)
        return data

    def mammo_abort(self, reason: str) -> None:
        """Abort the association for `reason` (A-ABORT through the state machine), reported
        once; the first reason sticks. For the DIMSE provider and the association."""
        if self.mammo_violation is None:
            self._mammo_abort(reason)

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
        report_abort(self.assoc, reason)
        self.event_queue.put("Evt19")  # invalid PDU -> A-ABORT (AA-1 or AA-8)


_REPORT_LOCK = threading.Lock()


def report_abort(assoc: Association, reason: str) -> None:
    """Hand an abort to the host's handler (one log line, one audit record), once per
    association."""
    with _REPORT_LOCK:  # the DUL thread and the connection's thread may both get here
        if getattr(assoc, ABORT_REPORTED_ATTRIBUTE, False):
            return
        setattr(assoc, ABORT_REPORTED_ATTRIBUTE, True)
    handler = getattr(assoc.dul, "mammo_on_violation", None)
    if handler is None:
        return
    try:
        handler(assoc, reason)
    except Exception:  # reporting must never keep the abort from happening
        log.exception("abort_report_failed")


def abort_reason(assoc: Association) -> str:
    """Why an association that ended without a release ended, from what our parts saw."""
    dul = assoc.dul
    for reason in (getattr(dul, "mammo_violation", None),
                   getattr(assoc, LOCAL_ABORT_ATTRIBUTE, None),
                   getattr(dul, "mammo_peer_end", None)):
        if reason:
            return str(reason)
    return "network_timeout" if dul.idle_timer_expired() else "aborted"


class GuardedStateMachine(StateMachine):
    """pynetdicom's DUL state machine that cannot die of an exception.

    An exception inside a state machine action (an even presentation context ID in an
    A-ASSOCIATE-RQ, a P-DATA for a context that was never accepted, ...) escapes
    `StateMachine.do_action` and `DULServiceProvider.run_reactor` alike: the DUL thread dies
    printing a raw traceback, no A-ABORT is sent and nothing is reported. Here the exception
    becomes one structured log line, an A-ABORT to the peer (as pynetdicom does for exceptions
    elsewhere in its reactor) and a reported abort.
    """

    def do_action(self, event: str) -> None:
        try:
            super().do_action(event)
        except Exception as error:
            state = self.current_state
            dul = cast(GuardedDUL, self.dul)
            reason = f"protocol_error:{type(error).__name__}"
            log.warning("protocol_state_error", fsm_event=event, state=state,
                        error=type(error).__name__)
            if getattr(dul, "mammo_violation", None) is None:
                dul.mammo_violation = reason
            assoc = dul.assoc
            abort = A_ABORT_RQ()
            abort.source = 0x02  # service provider
            abort.reason_diagnostic = 0x00
            try:
                if dul.socket is not None:
                    dul.socket.send(abort.encode())
                    dul.socket.close()  # and EVT_CONN_CLOSE, as a closed connection gives
            except Exception:  # the connection may already be gone
                pass
            assoc.is_aborted = True
            assoc.is_established = False
            assoc._kill = True
            dul._kill_thread = True
            report_abort(assoc, abort_reason(assoc))


def guard_association(assoc: Association, limits: WireLimits,
                      on_violation: WireViolationHandler | None = None) -> None:
    """Give an association (acceptor or requestor) the guarded PDU reader."""
    dul = assoc.dul
    dul.__class__ = GuardedDUL
    guarded = cast(GuardedDUL, dul)
    guarded.mammo_limits = limits
    guarded.mammo_meter = MessageMeter(limits)
    guarded.mammo_violation = None
    guarded.mammo_peer_end = None
    guarded.mammo_read_error = None
    guarded.mammo_on_violation = on_violation
    dul.state_machine.__class__ = GuardedStateMachine


class ConnectRecordingSocket(AssociationSocket):
    """A requestor's socket that keeps the error its connect failed with.

    Stock `AssociationSocket.connect` catches the OSError (refused, timed out, a TLS handshake
    that failed), logs it and queues Evt17: the association then only says it was not
    established. Its `_shutdown_socket` runs inside that `except` block, so the error is taken
    from there while a connect is in progress.
    """

    mammo_connecting = False
    mammo_connected = False  # the TCP connection (and TLS handshake) succeeded
    mammo_connect_error: OSError | None = None

    def connect(self, primitive: Any) -> None:
        self.mammo_connecting = True
        try:
            super().connect(primitive)
            self.mammo_connected = self._is_connected
        finally:
            self.mammo_connecting = False

    def _shutdown_socket(self) -> None:
        if self.mammo_connecting and not self._is_connected and self.mammo_connect_error is None:
            error = sys.exc_info()[1]
            if isinstance(error, OSError):
                self.mammo_connect_error = error
        super()._shutdown_socket()


class ReplyKeepingDIMSE(DIMSEServiceProvider):
    """A requestor's DIMSE provider whose reactor never takes the reply a `send_*` is waiting for.

    pynetdicom 3.0.4 pauses the association's reactor around each `send_*` by clearing
    `_reactor_checkpoint` and waiting until `_is_paused` reads True. That flag is still True
    from the previous request while the reactor, woken by the previous reply's `set()`, has not
    yet run: `threading.Event.wait` returns True to a notified waiter even when the flag was
    cleared again. Back-to-back requests then run with the reactor awake, and when it is
    scheduled late (a loaded host) it takes the next reply off the queue, logs "Received
    unexpected C-STORE service message" and drops it; the sender waits out its DIMSE timeout
    and aborts, though the peer had stored the object.

    Here the reactor's non-blocking read leaves a reply at the head of the queue while the
    checkpoint is clear (a sender is waiting), deciding and taking under the queue's own lock,
    which the sender's blocking read takes too. A reply with no sender waiting (one arriving
    after its DIMSE timeout) is still taken and dropped as before.
    """

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        waiting = self.msg_queue
        with waiting.mutex:
            if not waiting.queue:
                return None, None
            _, msg = waiting.queue[0]
            if (msg is not None and not msg.is_valid_request
                    and not self.assoc._reactor_checkpoint.is_set()):
                return None, None  # the paused sender's reply
            item = waiting.queue.popleft()
            waiting.not_full.notify()
            return item


class RequestorAE(AE):
    """An AE whose requested associations keep why their connection failed (`connect_error`)
    and whose replies reach the `send_*` that waits for them (`ReplyKeepingDIMSE`)."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        sock.__class__ = ConnectRecordingSocket
        assoc.dimse.__class__ = ReplyKeepingDIMSE
        return sock


def connect_error(assoc: Association) -> OSError | None:
    """The error a RequestorAE's association failed to connect with (TCP or TLS), if it did."""
    return getattr(assoc.dul.socket, "mammo_connect_error", None)


def connected(assoc: Association) -> bool:
    """Whether a RequestorAE's association got its connection (TCP, and TLS when asked)."""
    return bool(getattr(assoc.dul.socket, "mammo_connected", False))


@dataclass(frozen=True)
class PeerEnd:
    """How a guarded association ended without a release, as its reader saw it."""

    how: str | None  # "peer_aborted", "connection_closed", or why we aborted (a wire violation)
    read_error: OSError | None  # what the read that ended the connection raised, if anything


def peer_end(assoc: Association) -> PeerEnd:
    dul = assoc.dul
    how = getattr(dul, "mammo_violation", None) or getattr(dul, "mammo_peer_end", None)
    return PeerEnd(str(how) if how else None, getattr(dul, "mammo_read_error", None))


def association_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ for a requested association, or None when none came.

    pynetdicom 3.0.4 races with a fast rejection: its DUL thread can connect, send the request,
    read the RJ and close the connection (AE-4, which leaves the RJ in `to_user_queue`) before
    the requesting thread checks that the connection is up; that check then sees a closed
    connection, takes it for a failed connect and aborts without reading the RJ (about 1 in 10
    rejections from a local dcmtk storescp). The RJ is still in the queue: read it from there.
    """
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and isinstance(answer, A_ASSOCIATE):
        return answer
    queued = assoc.dul.to_user_queue
    with queued.mutex:  # the DUL thread may still be putting into it
        primitives = list(queued.queue)
    for primitive in primitives:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return primitive
    return None


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

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """These bytes of a data set being received were written: have the disk start on them."""


WRITEBACK_BYTES = 4 * 1024 * 1024  # how much of a data set is written before its writeback starts


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
    """pynetdicom's DIMSE provider with a failing or refused chunked write turned into 0xA700,
    every file it starts accounted for, and no message it cannot bound or decode.

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

    Every temporary file a message starts is remembered (`started_files`): a C-STORE decoded but
    never handled (pynetdicom aborts a request it cannot serve, e.g. a NUL in its SOP Class UID,
    before our handler sees it) leaves no file once the association is over
    (`discard_partial_receive`). Any other exception while decoding a message, and a data set
    held in memory (anything but a C-STORE) past MAX_INLINE_DATA_SET_BYTES, abort the
    association with the reason instead of killing its reader thread or growing without bound.
    """

    def __init__(self, assoc: Association, policy: StoreReceivePolicy) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._refusal: str | None = None  # set while the rest of a message is being dropped
        self.started_files: set[Path] = set()
        self._written_back = 0  # bytes of the current data set file whose writeback was started

    def receive_primitive(self, primitive: P_DATA) -> None:
        if getattr(self.dul, "mammo_violation", None) is not None:
            return  # aborting: nothing more is decoded or written
        if self._refusal is not None and self.message is not None:
            if _ends_data_set(primitive):
                self._deliver_refused()
            return
        writing_before = self.message is not None and self.message._data_set_file is not None
        finishing = (self.message._data_set_file if writing_before and self.message is not None
                     and _ends_data_set(primitive) else None)
        try:
            super().receive_primitive(primitive)
        except OSError as error:
            self._remember_file()
            if not isinstance(self.message, C_STORE_RQ):
                self._abort(f"dimse_message_undecodable:{type(error).__name__}")
                return
            self._refuse(_errno_name(error))
            if _ends_data_set(primitive):
                self._deliver_refused()
            return
        except Exception as error:  # a peer's command set pynetdicom cannot act on
            self._remember_file()
            self._abort(f"dimse_message_undecodable:{type(error).__name__}")
            return
        self._remember_file()
        if finishing is not None:  # the data set is complete: its last bytes to disk now too
            self._start_writeback(finishing, whole=True)
        message = self.message
        if message is not None and "Evt19" in self.dul.event_queue.queue:
            # pynetdicom found the completed message invalid and queued its own abort
            self._abort("dimse_message_invalid")
            return
        if (message is not None and message._data_set_file is None
                and isinstance(message.data_set, io.BytesIO)
                and message.data_set.tell() > MAX_INLINE_DATA_SET_BYTES):
            self._abort("message_too_long")  # the wire meter's rule, checked where bytes land
            return
        started_now = (
            message is not None and not writing_before and message._data_set_file is not None
        )
        if started_now:
            self._written_back = 0
            refusal = self._policy.refusal_before_writing()
            if refusal is not None:
                self._refuse(refusal)
                return
        if message is not None and message._data_set_file is not None:
            self._start_writeback(message._data_set_file)

    def write_data_set_fragments(self, pdu: bytes) -> bool:
        """Write the fragments of a P-DATA-TF PDU to the file of the C-STORE data set being
        received, straight from the PDU's buffer; False (nothing done) unless the PDU holds data
        set fragments only, none of them the last, and such a file is open."""
        message = self.message
        handle = getattr(message, "_data_set_file", None)
        if self._refusal is not None or handle is None:
            return False
        fragments = _middle_data_set_fragments(pdu)
        if fragments is None:
            return False
        view = memoryview(pdu)
        raw = handle.file  # the buffered file under NamedTemporaryFile's wrapper
        try:
            for start, end in fragments:
                raw.write(view[start:end])
            raw.flush()
        except OSError as error:
            self._remember_file()
            self._refuse(_errno_name(error))
            return True
        self._start_writeback(raw)
        return True

    def _start_writeback(self, handle: Any, whole: bool = False) -> None:
        """Every WRITEBACK_BYTES of a data set file, and once it is complete (`whole`), have the
        disk start on what was written, so that the fsync before the C-STORE is answered finds
        little left to write."""
        try:
            written = handle.tell()
            if written - self._written_back >= (1 if whole else WRITEBACK_BYTES):
                self._policy.start_writeback(handle.fileno(), self._written_back,
                                             written - self._written_back)
                self._written_back = written
        except (ValueError, OSError):  # a complete one may be closed by its handler already
            pass

    def _remember_file(self) -> None:
        """Note the temporary file of the current message, dropping those already gone (moved
        into the spool or deleted), so a long association keeps a short list."""
        path = getattr(self.message, "_data_set_path", None)
        if isinstance(path, Path) and path not in self.started_files:
            if len(self.started_files) >= 16:
                self.started_files = {p for p in self.started_files if p.exists()}
            self.started_files.add(path)

    def _abort(self, reason: str) -> None:
        """Delete what the current message wrote and abort the association for `reason`."""
        message = self.message
        handle = getattr(message, "_data_set_file", None)
        if handle is not None:
            _close_and_delete(handle)
        dul = self.dul
        if isinstance(dul, GuardedDUL):
            dul.mammo_abort(reason)
        else:
            dul.event_queue.put("Evt19")

    def _refuse(self, reason: str) -> None:
        """Delete what was written of the current C-STORE; drop the rest of its fragments."""
        message = self.message
        assert message is not None
        handle = message._data_set_file
        if handle is not None:
            _close_and_delete(handle)
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


def _middle_data_set_fragments(pdu: bytes) -> list[tuple[int, int]] | None:
    """(start, end) of each fragment's value in a P-DATA-TF PDU when every item is a data set
    fragment that is not the last one (PS3.8 E.2 control header xxxxxx00) and the items exactly
    fill the PDU; None otherwise (then pynetdicom decodes it, or refuses it)."""
    fragments = []
    offset = PDU_HEADER_BYTES
    while offset < len(pdu):
        if offset + 6 > len(pdu):
            return None
        item_length = int.from_bytes(pdu[offset:offset + 4], "big")
        end = offset + 4 + item_length
        if item_length < 2 or end > len(pdu) or pdu[offset + 5] & 0x03:
            return None
        fragments.append((offset + 6, end))
        offset = end
    return fragments or None


def _close_and_delete(handle: Any) -> None:
    try:
        handle.close()  # flushing the buffer may fail again on a full disk: the fd closes
    except OSError:
        pass
    Path(handle.name).unlink(missing_ok=True)


def _errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, type(error).__name__).lower()


def discard_partial_receive(assoc: Association) -> int:
    """Delete every temporary file the association's messages started that is still in tmp/
    once it is over: a C-STORE still being received, or decoded but never handled. Returns how
    many were deleted."""
    dimse = assoc.dimse
    paths: set[Path] = set(getattr(dimse, "started_files", set()))
    message = getattr(dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is not None:
        try:
            handle.close()
        except OSError:
            pass
        paths.add(Path(handle.name))
    deleted = 0
    for path in paths:
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("partial_receive_not_deleted", error=error.strerror)
    return deleted


# --- ACSE: admission in front of negotiation -----------------------------------------------------
@dataclass(frozen=True)
class RefusedContext:
    """A presentation context refused at negotiation (PS3.8 9.3.3.2 result/reason)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    result: int  # 1 user rejection, 2 no reason, 3 abstract syntax / 4 transfer syntaxes unsupported


class AssociationGate(Protocol):
    """Who may associate, asked once per connection (node/admission.py implements it)."""

    def refuses_unread(self, request: AssociateRequestSummary, host: str) -> bool:
        """True when `admit` will reject this request whatever its presentation contexts say
        (asked before they are decoded, so that a refused request costs nothing to read)."""

    def admit(self, assoc: Association, request: A_ASSOCIATE) -> AssociateRejection | None:
        """The rejection to send, or None to negotiate (the gate may then hold a slot)."""

    def negotiation_failed(self, assoc: Association) -> None:
        """Negotiation ran but did not establish the association."""

    def abstract_syntaxes(self, called_ae: str) -> frozenset[str] | None:
        """The SOP classes the called AE title takes (None: every one the listener supports);
        asked after `admit` admitted the request, before its contexts are negotiated."""

    def contexts_refused(self, assoc: Association, refused: list[RefusedContext]) -> None:
        """The association was established without these proposed presentation contexts."""

    def association_ended(self, assoc: Association) -> None:
        """The association (or the connection) is over."""


class GatedACSE(ACSE):
    """pynetdicom's ACSE with the gate's admission rule in front of negotiation."""

    gate: AssociationGate

    def send_accept(self) -> None:
        # Once the A-ASSOCIATE-AC is on its way the peer may send, and we may abort, before
        # pynetdicom marks the association established: such an abort is on an established one.
        setattr(self.assoc, ESTABLISHED_ATTRIBUTE, True)
        super().send_accept()

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        rejection = self.gate.admit(self.assoc, request)
        if rejection is None:
            # Several called AE titles share the listener (one per pipeline): answer as the one
            # the peer called (pynetdicom's require_called_aet compares with it) and negotiate
            # only the SOP classes that title takes.
            self.acceptor.ae_title = request.called_ae_title
            wanted = self.gate.abstract_syntaxes(str(request.called_ae_title))
            if wanted is not None:
                self.acceptor.supported_contexts = [
                    cx for cx in self.acceptor.supported_contexts
                    if str(cx.abstract_syntax) in wanted]
            super()._negotiate_as_acceptor()
            if not self.assoc.is_established:
                self.gate.negotiation_failed(self.assoc)
                return
            setattr(self.assoc, ESTABLISHED_ATTRIBUTE, True)
            refused = [
                RefusedContext(int(cx.context_id or 0), str(cx.abstract_syntax or ""),
                               tuple(str(syntax) for syntax in cx.transfer_syntax),
                               int(cx.result or 0))
                for cx in self.assoc.rejected_contexts
            ]
            if refused:
                self.gate.contexts_refused(self.assoc, refused)
            return
        self.send_reject(*rejection)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


# --- the association: a request pynetdicom cannot serve is aborted with its reason ---------------
class GuardedAssociation(Association):
    """pynetdicom's Association that says why it aborted a request it could not serve.

    `Association._serve_request` aborts on a DIMSE request for a context that was not accepted,
    a SOP class no service class serves (a NUL inside the command's Affected SOP Class UID is
    one) or an exception in the service class, and logs the reason only to pynetdicom's logger.
    Here the reason is kept (`LOCAL_ABORT_ATTRIBUTE`) for the abort report; the C-STORE's file is
    deleted once the association is over (`discard_partial_receive`).
    """

    def _serve_request(self, msg: Any, context_id: int) -> None:
        setattr(self, LOCAL_ABORT_ATTRIBUTE, _request_refusal(self, msg, context_id))
        try:
            super()._serve_request(msg, context_id)
        finally:
            if not self.is_aborted:
                setattr(self, LOCAL_ABORT_ATTRIBUTE, None)


    # pynetdicom rebinds `abort` on the instance to one of these two (events.py, acse.py)
    def _abort_blocking(self, block: bool = True) -> None:
        self._mammo_note_timeout()
        super()._abort_blocking(block)

    def _abort_nonblocking(self, block: bool = False) -> None:
        self._mammo_note_timeout()
        super()._abort_nonblocking(block)

    def _mammo_note_timeout(self) -> None:
        if getattr(self, LOCAL_ABORT_ATTRIBUTE, None) is None and self.dul.idle_timer_expired():
            setattr(self, LOCAL_ABORT_ATTRIBUTE, "network_timeout")  # before the abort resets it


def _request_refusal(assoc: Association, msg: Any, context_id: int) -> str:
    """The reason pynetdicom's `_serve_request` would abort for, should it abort."""
    if context_id not in assoc._accepted_cx:
        return "dimse_context_not_accepted"
    class_uid = getattr(msg, "AffectedSOPClassUID", None) or getattr(
        msg, "RequestedSOPClassUID", None) or ""
    if uid_to_service_class(str(class_uid)) is ServiceClass:
        return "sop_class_not_supported"
    return "dimse_request_failed"


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
            assoc.__class__ = GuardedAssociation
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
                if getattr(assoc, ESTABLISHED_ATTRIBUTE, False) and not assoc.is_released:
                    report_abort(assoc, abort_reason(assoc))  # unless reported when it happened
                discarded = discard_partial_receive(assoc)
                if discarded:
                    log.info("partial_receive_discarded", files=discarded)

    return ConnectionHandler


class _ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a deeper accept backlog and daemon connection threads.

    TLS is never done here (the stock server handshakes inside the accept loop, where one idle
    connection stalls every other): the connection handler does it on the connection's thread.
    """

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """An exception out of a connection's handler: one structured log line (socketserver
        would print a raw traceback to stderr, i.e. into node.log)."""
        host = client_address[0] if isinstance(client_address, tuple) else None
        log.error("connection_handler_failed", host=host, exc_info=True)


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


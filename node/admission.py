"""Who may associate: connection and association admission for the listener.

In the order a peer meets them:
1. `PendingConnections`: at most `node.max_pending_connections` connections that have not sent an
   A-ASSOCIATE-RQ yet; over it the oldest is closed.
2. The TLS handshake (when `node.tls` is set), on the connection's own thread within the ACSE
   timeout.
3. `admission_rejection`: the called AE title must be one of ours (a pipeline's, or
   `node.ae_title` without `pipelines`), the calling AE title and its host on that pipeline's
   allow-list (rejected-permanent), and the request may propose at most
   `node.max_presentation_contexts` presentation contexts (rejected-permanent, no reason given).
   These are decided from the A-ASSOCIATE-RQ's bytes before pynetdicom decodes its presentation
   contexts (`ConnectionGate.refuses_unread`): a stranger's 10,000 contexts are never decoded.
4. `disk_rejection`: below the spool's free-space watermark storage is refused as transient;
   Verification alone still gets in, so monitoring can tell a full node from a dead one.
5. `AssociationLimiter`: at most `node.max_associations` admitted associations (rejected-transient,
   local-limit-exceeded).
Each refusal is logged once and audited by the listener's `record_rejection`. Presentation
contexts refused at negotiation (a SOP class or transfer syntaxes we do not take) are logged and
audited as `presentation_contexts_refused`.

The rules are pure functions; `Admission` strings them together for one listener, and
`ConnectionGate` is what pynetdicom's ACSE asks (node/pynetdicom_internals.py) for one connection.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from node.audit import open_audit
from node.logs import get_logger
from node.pynetdicom_internals import (
    AssociationGate,
    RefusedContext,
    ServeAssociation,
    proposed_context_count,
)
from node.settings import Settings
from node.tls import describe_tls_error
from node.uids import is_valid_uid
from node.vocabulary import (
    REJECT_CALLED_AE_NOT_RECOGNISED,
    REJECT_CALLING_AE_NOT_RECOGNISED,
    REJECT_LOCAL_LIMIT_EXCEEDED,
    REJECT_NO_REASON_GIVEN,
    VERIFICATION,
    AssociateRejection,
    storage_sop_classes_named,
)
from node.wire import AssociateRequestSummary

log = get_logger("node.admission")

# PS3.8 Table 9-18: why a proposed presentation context was refused.
CONTEXT_RESULTS = {
    0x01: "user_rejection",
    0x02: "no_reason",
    0x03: "abstract_syntax_not_supported",
    0x04: "transfer_syntaxes_not_supported",
}
MAX_CONTEXTS_DESCRIBED = 16  # per log line / audit record; the count says how many in all


def admission_rejection(settings: Settings, calling_ae: str, called_ae: str, host: str,
                        presentation_contexts: int = 0) -> tuple[AssociateRejection, str] | None:
    """Why an association request must be rejected, or None to admit it (pure). Needs nothing a
    request's presentation contexts say beyond their number, so it can be decided before they
    are decoded."""
    pipeline = settings.pipeline_of_called_ae(called_ae)  # node.ae_title without `pipelines`
    if pipeline is None:
        return REJECT_CALLED_AE_NOT_RECOGNISED, "called_ae_title_not_recognised"
    calling = calling_ae.strip()
    known = [c for c in pipeline.allowed_callers if c.ae_title == calling]
    if not known:
        return REJECT_CALLING_AE_NOT_RECOGNISED, "calling_ae_title_not_recognised"
    if not any(c.host is None or c.host == host for c in known):
        return REJECT_CALLING_AE_NOT_RECOGNISED, "calling_host_not_allowed"
    if presentation_contexts > settings.node.max_presentation_contexts:
        return REJECT_NO_REASON_GIVEN, "too_many_presentation_contexts"
    return None


def describe_refused_contexts(refused: Iterable[RefusedContext]) -> list[dict[str, object]]:
    """Refused presentation contexts as the log and the audit trail hold them: a peer's UIDs only
    when they are valid UIDs, at most MAX_CONTEXTS_DESCRIBED of them (pure)."""
    described: list[dict[str, object]] = []
    for context in list(refused)[:MAX_CONTEXTS_DESCRIBED]:
        described.append({
            "context_id": context.context_id,
            "sop_class_uid": _loggable_uid(context.abstract_syntax),
            "transfer_syntaxes": [_loggable_uid(s) for s in context.transfer_syntaxes[:8]],
            "reason": CONTEXT_RESULTS.get(context.result, f"0x{context.result:02X}"),
        })
    return described


def _loggable_uid(value: str) -> str:
    return value if is_valid_uid(value) else "(invalid)"


def disk_rejection(
    free_bytes: int, min_free_bytes: int, abstract_syntaxes: Iterable[str]
) -> AssociateRejection | None:
    """The A-ASSOCIATE-RJ for a spool below its watermark, or None to go on (pure)."""
    if free_bytes >= min_free_bytes:
        return None
    if all(str(syntax) == VERIFICATION for syntax in abstract_syntaxes):
        return None
    return REJECT_LOCAL_LIMIT_EXCEEDED


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
        self._holders: set[object] = set()  # an association holds at most one slot
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return len(self._holders)

    def acquire(self, holder: object) -> bool:
        with self._lock:
            if len(self._holders) >= self.limit:
                return False
            self._holders.add(holder)
            return True

    def release(self, holder: object) -> None:
        with self._lock:
            self._holders.discard(holder)


class RejectionRecorder(Protocol):
    """One log line and one audit record for a refused association or connection."""

    def __call__(self, reason: str, **fields: object) -> None: ...


class Admission:
    """The listener's admission: the rules above, for every connection it accepts."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None,
                 spool_free_bytes: Callable[[], int], record_rejection: RejectionRecorder) -> None:
        self.settings = settings
        self.ssl_context = ssl_context
        self.spool_free_bytes = spool_free_bytes
        self.record_rejection = record_rejection
        self.limiter = AssociationLimiter(settings.node.max_associations)
        self.pending = PendingConnections(settings.node.max_pending_connections)
        self.audit = open_audit(settings, "listener")

    def serve_connection(self, sock: socket.socket, host: str,
                         serve_association: ServeAssociation) -> None:
        """Count the connection as pending, secure it, then serve its association."""
        token, evicted = self.pending.enter(sock, host)
        for evicted_host in evicted:
            self.record_rejection("too_many_pending_connections", host=evicted_host,
                                  action="closed")
        try:
            secured: socket.socket | ssl.SSLSocket = sock
            if self.ssl_context is not None:
                handshaken = self._tls_handshake(sock, self.ssl_context, host, token)
                if handshaken is None:
                    return
                secured = handshaken
            secured.settimeout(self.settings.node.network_timeout_s)
            serve_association(secured, ConnectionGate(self, token))
        finally:
            self.pending.leave(token)

    def _tls_handshake(self, sock: socket.socket, context: ssl.SSLContext, host: str,
                       token: int) -> ssl.SSLSocket | None:
        """Handshake here, on this connection's thread, within the ACSE timeout."""
        try:
            sock.settimeout(self.settings.node.acse_timeout_s)
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self.pending.update(token, sock)
            sock.do_handshake()
        except (OSError, ValueError) as error:
            if not self.pending.was_evicted(token):  # already logged as evicted
                self.record_rejection("tls_handshake_failed", host=host,
                                      detail=describe_tls_error(error))
            sock.close()  # the TLS socket once wrapped (closing it closes the raw one)
            return None
        return sock

    def decide(self, assoc: Association, request: A_ASSOCIATE) -> tuple[AssociateRejection,
                                                                          str] | None:
        """The rules in order; None admits the request and takes an association slot for it."""
        host = assoc.requestor.address
        contexts = proposed_context_count(assoc)
        decision = admission_rejection(
            self.settings, str(request.calling_ae_title), str(request.called_ae_title), host,
            len(request.presentation_context_definition_list) if contexts is None else contexts,
        )
        if decision is None:  # below the disk watermark: storage is refused as transient
            syntaxes = [str(cx.abstract_syntax)
                        for cx in request.presentation_context_definition_list]
            full = disk_rejection(self.spool_free_bytes(), self.settings.spool.min_free_bytes,
                                  syntaxes)
            decision = None if full is None else (full, "disk_below_watermark")
        if decision is None and not self.limiter.acquire(assoc):
            decision = (REJECT_LOCAL_LIMIT_EXCEEDED, "too_many_associations")
        return decision


class ConnectionGate(AssociationGate):
    """Admission as pynetdicom's ACSE asks it, for the association of one connection."""

    def __init__(self, admission: Admission, pending_token: int) -> None:
        self._admission = admission
        self._pending_token = pending_token

    def refuses_unread(self, request: AssociateRequestSummary, host: str) -> bool:
        return admission_rejection(self._admission.settings, request.calling_ae,
                                   request.called_ae, host,
                                   request.presentation_contexts) is not None

    def admit(self, assoc: Association, request: A_ASSOCIATE) -> AssociateRejection | None:
        admission = self._admission
        admission.pending.leave(self._pending_token)  # the request arrived: no longer pending
        decision = admission.decide(assoc, request)
        if decision is None:
            return None
        rejection, why = decision
        contexts = proposed_context_count(assoc)
        admission.record_rejection(
            why,
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=str(request.called_ae_title).strip(),
            host=assoc.requestor.address,
            **({} if contexts is None else {"presentation_contexts": contexts}),
            **rejection.audit_fields(),
        )
        return rejection

    def abstract_syntaxes(self, called_ae: str) -> frozenset[str] | None:
        """The called AE title's pipeline takes Verification and its own storage SOP classes."""
        pipeline = self._admission.settings.pipeline_of_called_ae(called_ae)
        if pipeline is None or pipeline.sop_classes is None:
            return None
        return frozenset({str(VERIFICATION),
                          *(str(sop) for sop in storage_sop_classes_named(pipeline.sop_classes))})

    def contexts_refused(self, assoc: Association, refused: list[RefusedContext]) -> None:
        fields = {
            "calling_ae": str(assoc.requestor.ae_title).strip(),
            "called_ae": str(assoc.acceptor.ae_title).strip(),
            "host": assoc.requestor.address,
            "refused_count": len(refused),
            "accepted_count": len(assoc.accepted_contexts),
            "refused": describe_refused_contexts(refused),
        }
        log.warning("presentation_contexts_refused", **fields)
        self._admission.audit.record("presentation_contexts_refused", **fields)

    def negotiation_failed(self, assoc: Association) -> None:
        self._admission.limiter.release(assoc)

    def association_ended(self, assoc: Association) -> None:
        self._admission.limiter.release(assoc)

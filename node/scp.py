"""The DICOM listener, wired: the AE, its handlers, the server thread.

Each layer lives in its own module; this one only puts them together:
- node/admission.py: who may connect and associate (pending cap, TLS, AE/host rules, limits);
- node/wire.py + node/pynetdicom_internals.py: the bounded PDU reader and every override of
  pynetdicom's internals (the server, ACSE, DUL and DIMSE hooks);
- node/receive.py: the C-STORE handler (validate, move into the spool, status);
- node/vocabulary.py: the SOP classes, transfer syntaxes and statuses we speak.
"""

from __future__ import annotations

import socket
import ssl

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from node import metrics
from node.admission import Admission, AssociationLimiter, PendingConnections
from node.audit import open_audit
from node.completion import AssociationTracker
from node.logs import get_logger
from node.pynetdicom_internals import (
    ChunkedStoreDIMSE,
    ServeAssociation,
    check_pynetdicom_version,
    enable_chunked_receive,
    guard_association,
    is_negotiating,
    server_address,
    start_listener,
)
from node.receive import StoreReceiver, association_id
from node.settings import Settings
from node.spool import Spool
from node.tls import server_context
from node.vocabulary import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION,
    StoreStatus,
)
from node.wire import WireLimits

log = get_logger("node.scp")


class StoreSCP:
    """The node's listener. Non-blocking: `start()` returns, `stop()` shuts down from any thread."""

    def __init__(self, settings: Settings, spool: Spool, tracker: AssociationTracker) -> None:
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self.audit = open_audit(settings, "listener")
        self.receiver = StoreReceiver(settings, spool, tracker, self.audit)
        # Built here so a certificate that cannot be loaded stops the node at startup.
        self.ssl_context: ssl.SSLContext | None = (
            server_context(settings.node.tls) if settings.node.tls is not None else None
        )
        self.admission = Admission(settings, self.ssl_context, self.receiver.spool_free_bytes,
                                   self.record_rejection)
        node = settings.node
        self.wire_limits = WireLimits(
            max_pdata_pdu_bytes=node.max_pdu_bytes,
            max_message_bytes=node.max_message_bytes,
            pdu_timeout_s=node.network_timeout_s,
            io_timeout_s=node.network_timeout_s,
        )
        self._server: ThreadedAssociationServer | None = None

    @property
    def limiter(self) -> AssociationLimiter:
        return self.admission.limiter

    @property
    def pending(self) -> PendingConnections:
        return self.admission.pending

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
        check_pynetdicom_version()
        enable_chunked_receive(self.spool.tmp_dir)
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.receiver.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
        ]
        address = (self.settings.node.bind_address, self.settings.node.port)
        self._server = start_listener(self.build_ae(), address, handlers, self)
        return server_address(self._server)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.receiver.close()

    # --- per connection (pynetdicom_internals.ConnectionHost) -----------------------------------
    def serve_connection(self, sock: socket.socket, host: str, serve_association: ServeAssociation) -> None:
        self.admission.serve_connection(sock, host, serve_association)

    def prepare_association(self, assoc: Association) -> None:
        # Full disk mid-receive -> 0xA700 instead of a dead association (node/receive.py).
        assoc.dimse = ChunkedStoreDIMSE(assoc, self.receiver)
        guard_association(assoc, self.wire_limits, self.record_abort)

    # --- handlers ---------------------------------------------------------------------------
    def handle_echo(self, event: Event) -> int:
        return StoreStatus.SUCCESS

    def handle_accepted(self, event: Event) -> None:
        assoc = event.assoc
        fields = {
            "association_id": association_id(assoc),
            "calling_ae": str(assoc.requestor.ae_title).strip(),
            "called_ae": str(assoc.acceptor.ae_title).strip(),
            "host": assoc.requestor.address,
            "tls": self.ssl_context is not None,
        }
        metrics.ASSOCIATIONS.labels(outcome="accepted", reason="").inc()
        log.info("association_accepted", **fields)
        self.audit.record("association_accepted", **fields)

    def record_rejection(self, reason: str, **fields: object) -> None:
        """One log line and one audit record for a refused association or connection."""
        metrics.ASSOCIATIONS.labels(outcome="rejected", reason=reason).inc()
        log.warning("association_rejected", reason=reason, **fields)
        self.audit.record("association_rejected", reason=reason, **fields)

    def record_abort(self, assoc: Association, reason: str) -> None:
        """Called by the PDU guard when it aborts: one log line, one audit record (no PHI),
        `association_aborted` with the stage it happened at (negotiation or established)."""
        calling = assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else ""
        fields = {
            "association_id": association_id(assoc),
            "calling_ae": str(calling or "").strip(),
            "host": assoc.requestor.address,
            "stage": "negotiation" if is_negotiating(assoc) else "established",
        }
        metrics.ASSOCIATIONS_ABORTED.labels(reason=reason).inc()
        log.warning("association_aborted", reason=reason, **fields)
        self.audit.record("association_aborted", reason=reason, action="aborted", **fields)

    def handle_released(self, event: Event) -> None:
        self.tracker.close(association_id(event.assoc))

    def handle_aborted(self, event: Event) -> None:
        # Every abort, whoever started it, reaches `record_abort` once with its reason
        # (node/pynetdicom_internals.py: report_abort, abort_reason).
        self.tracker.close(association_id(event.assoc))

    def handle_conn_close(self, event: Event) -> None:
        self.tracker.close(association_id(event.assoc))

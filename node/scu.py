"""Sending: C-ECHO and C-STORE to a configured destination.

Each (SOP class, transfer syntax) pair gets its own presentation context: with several transfer
syntaxes in one context the peer picks one and objects in the others could not be sent.

With `destinations[].tls` the association runs over TLS 1.2+ and the destination's certificate
is verified (a failed verification is a failed association: retried, then parked in failed/).
Every read from the destination is bounded like the listener's (node/wire.py, installed by
node/pynetdicom_internals.guard_association): a PACS that stalls mid-PDU or announces a giant PDU
gets an A-ABORT, not our memory or our time.

An object whose presentation context the destination does not accept is never offered (it is
`refused`, with the SOP class and transfer syntax in words); a C-STORE that gets no status ends
the attempt's association, and the objects after it wait for the next attempt.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from node.errors import TransientError
from node.logs import get_logger
from node.pynetdicom_internals import (
    RequestorAE,
    association_rejection,
    bound_connect_socket,
    connect_error,
    connected,
    guard_association,
    peer_end,
)
from node.settings import Destination, Settings
from node.tls import client_context
from node.vocabulary import VERIFICATION, is_stored
from node.wire import WireLimits

log = get_logger("node.scu")

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class SendOutcome:
    """What the destination answered for one object."""

    sop_uid: str
    status: int | None  # None: never answered (association failed or aborted)
    # Why it was never offered, when the destination itself refuses it (no accepted presentation
    # context for its SOP class and transfer syntax): sending it again cannot help.
    refused: str | None = None
    # Why no status came, when the association says (rejected, ended mid-send); None otherwise.
    unanswered: str | None = None

    @property
    def ok(self) -> bool:
        # 0xB000-0xBFFF are warnings: the object was stored (e.g. coercion of elements).
        return is_stored(self.status)


def _scu_ae(settings: Settings, destination: Destination) -> AE:
    ae = RequestorAE(ae_title=settings.node.ae_title)
    ae.acse_timeout = destination.timeout_s
    ae.dimse_timeout = destination.timeout_s
    ae.network_timeout = destination.timeout_s
    ae.connection_timeout = destination.timeout_s  # TCP connect and TLS handshake
    ae.maximum_pdu_size = settings.node.max_pdu_bytes
    return ae


def _associate(settings: Settings, destination: Destination, ae: AE) -> Association:
    """Open the association, over TLS when the destination says so, with bounded reads."""
    tls_args = None
    if destination.tls is not None:
        context = client_context(destination.tls, key=f"destinations[{destination.name}].tls")
        tls_args = (context, destination.host)
    limits = WireLimits(
        max_pdata_pdu_bytes=settings.node.max_pdu_bytes,
        max_message_bytes=settings.node.max_message_bytes,
        pdu_timeout_s=destination.timeout_s,
        io_timeout_s=destination.timeout_s,
    )

    def report_abort(assoc: Association, reason: str) -> None:
        log.warning("association_aborted", destination=destination.name, reason=reason)

    def harden(event: Event) -> None:
        # Runs in the DUL thread right after connect(), which leaves the socket without timeout.
        bound_connect_socket(event.assoc, destination.timeout_s)
        guard_association(event.assoc, limits, report_abort)

    return ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, harden)],
    )


def echo(settings: Settings, destination: Destination) -> int:
    """C-ECHO the destination; returns the status, raises TransientError if it cannot associate."""
    ae = _scu_ae(settings, destination)
    ae.add_requested_context(VERIFICATION)
    started = time.monotonic()
    assoc = _associate(settings, destination, ae)
    if not assoc.is_established:
        raise TransientError(f"destination {destination.name}: "
                             f"{why_no_association(assoc, destination, started)}")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def send_files(settings: Settings, destination: Destination, paths: list[Path],
               on_stored: Callable[[SendOutcome], None] | None = None) -> list[SendOutcome]:
    """C-STORE every file on one association; never raises for a per-object failure.

    `on_stored` is called with each object's outcome as soon as the destination confirms storing
    it (the run's send journal), before the next C-STORE."""
    if not paths:
        return []
    headers = [(p, dcmread(p, stop_before_pixels=True)) for p in paths]
    pairs = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for _, h in headers})
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts needed, at most {MAX_CONTEXTS}")
    ae = _scu_ae(settings, destination)
    for sop_class, transfer_syntax in pairs:
        ae.add_requested_context(sop_class, [transfer_syntax])
    started = time.monotonic()
    assoc = _associate(settings, destination, ae)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # It answered, and took none of them (pynetdicom then aborts): as refused as can be.
            outcomes = [SendOutcome(str(h.SOPInstanceUID), None, refused=_refusal(
                str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))) for _, h in headers]
            _log_refusals(destination, outcomes)
            return outcomes
        why = why_no_association(assoc, destination, started)
        return [SendOutcome(str(h.SOPInstanceUID), None, unanswered=why) for _, h in headers]
    outcomes = []
    lost = False
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0]))
                for c in assoc.accepted_contexts}
    try:
        for path, header in headers:
            sop_class = str(header.SOPClassUID)
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
            if (sop_class, transfer_syntax) not in accepted:
                outcomes.append(SendOutcome(str(header.SOPInstanceUID), None,
                                            refused=_refusal(sop_class, transfer_syntax)))
                continue
            if lost or not assoc.is_established:
                outcomes.append(SendOutcome(str(header.SOPInstanceUID), None,
                                            unanswered=ENDED_MID_SEND))
                continue
            try:
                status = assoc.send_c_store(path)
            except RuntimeError:  # the association ended between the check above and the call
                status = None
            code = int(status.Status) if status is not None and "Status" in status else None
            outcome = SendOutcome(str(header.SOPInstanceUID), code,
                                  unanswered=ENDED_MID_SEND if code is None else None)
            outcomes.append(outcome)
            if on_stored is not None and outcome.ok:
                on_stored(outcome)
            # No status: the peer aborted or closed the connection, or never answered (pynetdicom
            # then aborts), or answered nonsense. The association is done for this attempt: the
            # next C-STORE on it would wait out the whole DIMSE timeout for an answer that cannot
            # come (pynetdicom marks it ended a moment after this call returns). The objects not
            # sent go again, with the retry, on a new association.
            lost = code is None
    finally:
        if assoc.is_established:
            if lost:
                assoc.abort()
            else:
                assoc.release()
    if lost:
        log.warning("send_association_lost", destination=destination.name,
                    answered=sum(o.status is not None for o in outcomes), of=len(outcomes))
    _log_refusals(destination, outcomes)
    return outcomes


def _log_refusals(destination: Destination, outcomes: list[SendOutcome]) -> None:
    for reason in dict.fromkeys(o.refused for o in outcomes if o.refused):
        log.warning("send_refused_by_destination", destination=destination.name, reason=reason,
                    objects=sum(o.refused == reason for o in outcomes))


ENDED_MID_SEND = "the association ended or went silent mid-send"
NO_ASSOCIATION = "no association (not established; no reason seen)"


class _RestatedByTheReason(logging.Filter):
    """Drops pynetdicom's own lines about an association request of ours that failed (the
    connect error, with a traceback for TLS; the A-ASSOCIATE-RJ over three lines; an abort; the
    ACSE timeout): `why_no_association` says the same once, in the send's reason and its log
    line, so a PACS that is down does not log three errors per attempt. Only pynetdicom's
    requestor code writes these."""

    _MESSAGES = ("Association request failed: unable to connect to remote",
                 "TCP Initialisation Error: ", "Association Rejected", "Result: ", "Reason: ",
                 "Association Aborted",
                 "ACSE timeout reached while waiting for response to association request")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ssl.SSLError):
            return False  # transport's traceback of a failed TLS handshake
        return not str(record.msg).startswith(self._MESSAGES)


_RESTATED = _RestatedByTheReason()
for _name in ("pynetdicom.acse", "pynetdicom.transport"):
    logging.getLogger(_name).addFilter(_RESTATED)


def why_no_association(assoc: Association, destination: Destination, started: float) -> str:
    """Why a requested association was not established, in words for radiology IT: the
    destination's A-ASSOCIATE-RJ, else what became of the connection. No PHI: the words are
    ours, the A-ASSOCIATE-RJ's and OpenSSL's (whose hostname mismatch names the configured
    host)."""
    rejection = _rejection(assoc)
    if rejection is not None:
        return rejection
    error = connect_error(assoc)
    if error is not None:
        return (f"no association: "
                f"{connect_failure(error, destination.timeout_s, destination.tls is not None)}")
    if not connected(assoc):
        return NO_ASSOCIATION
    end = peer_end(assoc)
    if isinstance(end.read_error, ssl.SSLError):
        # TLS 1.3: the destination checks our certificate after our side of the handshake is
        # done, and says what it thinks of it in an alert on the first read.
        return (f"no association: the destination ended the TLS connection "
                f"({_tls_reason(end.read_error)})")
    if end.how == "peer_aborted":
        return "no association: the destination aborted the association request (A-ABORT)"
    if end.how == "connection_closed":
        return ("no association: the destination closed the connection without answering the "
                "association request")
    if end.how is not None:
        return f"no association: the destination's answer broke the protocol ({end.how})"
    if time.monotonic() - started >= destination.timeout_s:
        return (f"no association: no answer to the association request within "
                f"{destination.timeout_s:g} s")
    return "no association: the destination's answer to the association request was not valid"


def connect_failure(error: OSError, timeout_s: float, tls: bool = False) -> str:
    """A failed connect (TCP, and the TLS handshake when `tls`) in words."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: the destination's certificate was not trusted ({error.verify_message})"
    if tls and isinstance(error, ConnectionResetError | ssl.SSLEOFError):
        # A refused TCP connect is ECONNREFUSED: a reset or an EOF comes from the other side
        # reading our ClientHello as something else.
        return "the connection was dropped in the TLS handshake (a port without TLS does that)"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed ({_tls_reason(error)})"
    if isinstance(error, TimeoutError):
        return f"no connection within {timeout_s:g} s (connect timed out)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (nothing listens on the destination's port)"
    if isinstance(error, socket.gaierror):
        return f"the destination's host name did not resolve ({error.strerror})"
    name = errno.errorcode.get(error.errno) if error.errno is not None else None
    what = error.strerror or type(error).__name__
    return f"no connection ({name}: {what})" if name else f"no connection ({what})"


def _tls_reason(error: ssl.SSLError) -> str:
    return str(getattr(error, "reason", None) or error.strerror or type(error).__name__)


def _rejection(assoc: Association) -> str | None:
    """The destination's A-ASSOCIATE-RJ in words (PS3.8 7.1.1.9-11), or None when it sent none
    (`why_no_association` then says what became of the connection)."""
    answer = association_rejection(assoc)
    if answer is None:
        return None
    return (f"association rejected: {answer.result_str.lower()}, "
            f"{answer.source_str.lower()}: {answer.reason_str.lower()}")


def _refusal(sop_class: str, transfer_syntax: str) -> str:
    """The destination's refusal of an object's presentation context, in words (no PHI)."""
    return (f"no presentation context accepted for {UID(sop_class).name} in "
            f"{UID(transfer_syntax).name}")

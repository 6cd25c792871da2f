"""Sending: C-ECHO and C-STORE to a configured destination.

Each (SOP class, transfer syntax) pair gets its own presentation context: with several transfer
syntaxes in one context the peer picks one and objects in the others could not be sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from node.errors import TransientError
from node.settings import Destination, Settings

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class SendOutcome:
    """What the destination answered for one object."""

    sop_uid: str
    status: int | None  # None: never answered (association failed or aborted)

    @property
    def ok(self) -> bool:
        # 0xB000-0xBFFF are warnings: the object was stored (e.g. coercion of elements).
        return self.status is not None and (self.status == 0 or 0xB000 <= self.status <= 0xBFFF)


def _scu_ae(settings: Settings, destination: Destination) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = destination.timeout_s
    ae.dimse_timeout = destination.timeout_s
    ae.network_timeout = destination.timeout_s
    ae.maximum_pdu_size = settings.node.max_pdu_bytes
    return ae


def echo(settings: Settings, destination: Destination) -> int:
    """C-ECHO the destination; returns the status, raises TransientError if it cannot associate."""
    ae = _scu_ae(settings, destination)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise TransientError(f"destination {destination.name}: association not established")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def send_files(settings: Settings, destination: Destination, paths: list[Path]) -> list[SendOutcome]:
    """C-STORE every file on one association; never raises for a per-object failure."""
    if not paths:
        return []
    headers = [(p, dcmread(p, stop_before_pixels=True)) for p in paths]
    pairs = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for _, h in headers})
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts needed, at most {MAX_CONTEXTS}")
    ae = _scu_ae(settings, destination)
    for sop_class, transfer_syntax in pairs:
        ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return [SendOutcome(str(h.SOPInstanceUID), None) for _, h in headers]
    outcomes = []
    try:
        for path, header in headers:
            if not assoc.is_established:
                outcomes.append(SendOutcome(str(header.SOPInstanceUID), None))
                continue
            status = assoc.send_c_store(path)
            code = int(status.Status) if status is not None and "Status" in status else None
            outcomes.append(SendOutcome(str(header.SOPInstanceUID), code))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes

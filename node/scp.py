"""The DICOM listener: association admission, C-ECHO and C-STORE into the spool.

The C-STORE handler validates a few header tags, moves the received file into the spool, appends
a manifest line and returns a status. Nothing else happens on the association thread.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.completion import AssociationTracker
from node.logs import get_logger
from node.settings import Settings
from node.spool import InstanceEntry, Spool, hash_key
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


class _AdmissionACSE(ACSE):
    """pynetdicom's ACSE with our admission rule in front: AE title *and* host allow-list."""

    settings: Settings

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        host = self.assoc.requestor.address
        decision = admission_rejection(
            self.settings, str(request.calling_ae_title), str(request.called_ae_title), host
        )
        if decision is None:
            super()._negotiate_as_acceptor()
            return
        (result, source, reason), why = decision
        log.warning(
            "association_rejected",
            reason=why,
            calling_ae_title=str(request.calling_ae_title).strip(),
            called_ae_title=str(request.called_ae_title).strip(),
            peer_host=host,
        )
        self.send_reject(result, source, reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _admission_request_handler(settings: Settings) -> type[RequestHandler]:
    acse_class = type("AdmissionACSE", (_AdmissionACSE,), {"settings": settings})

    class AdmissionRequestHandler(RequestHandler):
        def _create_association(self) -> Any:
            assoc = super()._create_association()
            assoc.acse = acse_class(assoc)
            return assoc

    return AdmissionRequestHandler


class StoreSCP:
    """The node's listener. Non-blocking: `start()` returns, `stop()` shuts down from any thread."""

    def __init__(self, settings: Settings, spool: Spool, tracker: AssociationTracker) -> None:
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    def build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = 30
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
        server = ThreadedAssociationServer(
            ae,
            address,
            self.settings.node.ae_title,
            ae.supported_contexts,
            evt_handlers=handlers,
            request_handler=_admission_request_handler(self.settings),
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
        log.info(
            "association_accepted",
            association_id=association_id(assoc),
            calling_ae_title=str(assoc.requestor.ae_title).strip(),
            peer_host=assoc.requestor.address,
        )

    def handle_released(self, event: Any) -> None:
        self.tracker.close(association_id(event.assoc))

    def handle_aborted(self, event: Any) -> None:
        log.warning("association_aborted", association_id=association_id(event.assoc))
        self.tracker.close(association_id(event.assoc))

    def handle_conn_close(self, event: Any) -> None:
        self.tracker.close(association_id(event.assoc))

    def handle_store(self, event: Any) -> int:
        started = time.monotonic()
        assoc_id = association_id(event.assoc)
        request = event.request
        path = Path(event.dataset_path)
        command_sop_uid = str(request.AffectedSOPInstanceUID)
        command_sop_class = str(request.AffectedSOPClassUID)
        status, reason, entry = self._admit_instance(path, command_sop_uid, command_sop_class, assoc_id)
        if status != STATUS_SUCCESS or entry is None:
            path.unlink(missing_ok=True)
            log.warning(
                "instance_rejected",
                association_id=assoc_id,
                status=f"0x{status:04X}",
                reason=reason,
                sop_class_uid=command_sop_class,
                sop_uid=command_sop_uid if is_valid_uid(command_sop_uid) else "(invalid)",
            )
            return status
        try:
            self.spool.add_instance(path, entry)
        except OSError as error:
            path.unlink(missing_ok=True)
            log.error("instance_not_stored", association_id=assoc_id, sop_uid=entry.sop_uid,
                      reason=error.strerror or type(error).__name__)
            return STATUS_OUT_OF_RESOURCES
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
        return STATUS_SUCCESS

    def _admit_instance(
        self, path: Path, command_sop_uid: str, command_sop_class: str, assoc_id: str
    ) -> tuple[int, str, InstanceEntry | None]:
        """Check one received file; (status, reason, manifest entry when accepted)."""
        if self.spool.free_bytes() < self.settings.spool.min_free_bytes:
            return STATUS_OUT_OF_RESOURCES, "disk_below_watermark", None
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
        except Exception as error:  # any parse failure of a peer's bytes is "cannot understand"
            return STATUS_CANNOT_UNDERSTAND, f"unreadable_dataset:{type(error).__name__}", None
        uids = {
            name: str(header.get(name, "") or "")
            for name in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        bad = [name for name, value in uids.items() if not is_valid_uid(value)]
        if bad:
            return STATUS_INVALID_UID, "invalid_uid:" + ",".join(bad), None
        if uids["SOPInstanceUID"] != command_sop_uid:
            return STATUS_INVALID_UID, "sop_instance_uid_differs_from_command", None
        if uids["SOPClassUID"] != command_sop_class:
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, "sop_class_differs_from_command", None
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
            size_bytes=path.stat().st_size,
            received_at=time.time(),
            association_id=assoc_id,
        )
        return STATUS_SUCCESS, "", entry

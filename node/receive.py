"""The C-STORE receive path: validate the received file, move it into the spool, answer a status.

pynetdicom writes each incoming data set to a file under the spool's tmp/ as it arrives (chunked
receive, node/pynetdicom_internals.py), and the kernel is asked to start writing it to disk every
few MiB (`start_writeback`), so the fsync at the end waits for the tail only.
`StoreReceiver.handle_store` then checks a few header tags and the pixel data against the command
(node/validate.py), hands the file to the `GroupCommitter` and waits: the committer's thread
moves it into incoming/ with its manifest line (node/spool.py `add_instances`: file fsync,
rename, manifest fsync, folder fsync), together with whatever other associations received
meanwhile, so concurrent associations share the fsyncs. Only then does the handler return the
C-STORE status, so a success is never sent for an instance that is not on disk.

When the disk fills mid-receive, or a data set starts while the spool is below its free-space
watermark, the receive is abandoned (`refusal_before_writing`): nothing of the instance stays on
disk and the sender gets 0xA700 (out of resources) on an association that stays usable. Why
stock pynetdicom 3.0.4 would instead leave the sender waiting forever: `ChunkedStoreDIMSE` in
node/pynetdicom_internals.py.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node import metrics, validate
from node.audit import AuditLog
from node.completion import AssociationTracker
from node.logs import get_logger
from node.pynetdicom_internals import association_tag, refusal_of
from node.runs import InstanceEntry, start_writeback
from node.settings import Pipeline, Settings
from node.spool import Spool, free_bytes, hash_key, study_key
from node.uids import is_valid_uid
from node.vocabulary import SOP_CLASS_NOT_SUPPORTED, StoreStatus, storage_sop_classes_named

log = get_logger("node.receive")

HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
)


def association_id(assoc: Association) -> str:
    """A short id per association for logs and the manifest (set once, on first use)."""
    return association_tag(assoc, lambda: uuid.uuid4().hex[:12])


def _loggable_uid(value: object) -> str:
    return str(value) if is_valid_uid(str(value)) else "(invalid)"


@dataclass
class _Commit:
    """One received file waiting for its group commit."""

    path: Path
    entry: InstanceEntry
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Path | BaseException | None = None


class GroupCommitter:
    """Makes received instances durable in groups, on one thread of its own.

    `commit` queues a file and waits until it is in incoming/ with its manifest line fsynced (or
    raises why not). The thread takes everything queued at once (up to `max_batch`) and commits
    it with `Spool.add_instances`, which issues each step's fsyncs at once, so associations
    receiving at the same time share the filesystem's journal commits instead of queueing for
    one each. Once the group's waiters are answered it deletes the earlier copies the group
    replaced (`Spool.drop_replaced`), off their wait.
    """

    def __init__(self, spool: Spool, max_batch: int = 64) -> None:
        self.spool = spool
        self.max_batch = max_batch
        self.groups = 0  # groups committed
        self.waiting = 0  # instances queued or being committed, their senders waiting
        self._queue: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def commit(self, path: Path, entry: InstanceEntry) -> Path:
        """Block until `path` is durable in the spool; its path there. Raises OSError when it
        could not be recorded (nothing of it may then be acknowledged)."""
        pending = _Commit(path, entry)
        with self._lock:
            queued = not self._stopped
            if queued:
                if self._thread is None:  # started on first use
                    self._thread = threading.Thread(target=self._run, name="group-commit",
                                                    daemon=True)
                    self._thread.start()
                self.waiting += 1
                self._queue.put(pending)
        if not queued:  # stopped: a straggler commits on its own thread
            return self.spool.add_instance(path, entry)
        try:
            pending.done.wait()
        finally:
            with self._lock:
                self.waiting -= 1
        if isinstance(pending.outcome, BaseException):
            raise pending.outcome
        assert pending.outcome is not None
        return pending.outcome

    def stop(self) -> None:
        """End the thread once what is queued is committed; later commits are done by their
        callers."""
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
            self._queue.put(None)  # after everything queued
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # stop after this group
                    self._queue.put(None)
                    break
                group.append(more)
            outcomes: list[Path | BaseException]
            try:
                outcomes = list(self.spool.add_instances([(c.path, c.entry) for c in group]))
            except BaseException as error:  # noqa: BLE001 - every waiter must hear of it
                outcomes = [error] * len(group)
            self.groups += 1
            for pending, outcome in zip(group, outcomes, strict=True):
                pending.outcome = outcome
                pending.done.set()
            try:
                self.spool.drop_replaced()
            except Exception as error:  # noqa: BLE001 - the thread must outlive a failed delete
                log.warning("replaced_copy_not_deleted", error=type(error).__name__)


class StoreReceiver:
    """The listener's C-STORE handler and the receive policy its DIMSE provider asks."""

    def __init__(self, settings: Settings, spool: Spool, tracker: AssociationTracker,
                 audit: AuditLog) -> None:
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self.audit = audit
        self.committer = GroupCommitter(spool)

    def close(self) -> None:
        """Stop the commit thread (the listener stopped)."""
        self.committer.stop()

    # --- asked while a data set arrives (StoreReceivePolicy) -----------------------------------
    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        start_writeback(fd, offset, length)

    def spool_free_bytes(self) -> int:
        return free_bytes(self.settings.spool.dir)

    def refusal_before_writing(self) -> str | None:
        if self.spool_free_bytes() < self.settings.spool.min_free_bytes:
            return "disk_below_watermark"
        return None

    def receive_abandoned(self, reason: str, affected_sop_uid: object) -> None:
        log.warning("instance_receive_abandoned", reason=reason,
                    sop_uid=_loggable_uid(affected_sop_uid))

    # --- the handler (evt.EVT_C_STORE) ----------------------------------------------------------
    def handle_store(self, event: Event) -> int:
        started = time.monotonic()
        assoc_id = association_id(event.assoc)
        request = cast(C_STORE, event.request)  # bound to EVT_C_STORE only
        path = Path(event.dataset_path)
        command_sop_uid = str(request.AffectedSOPInstanceUID)
        command_sop_class = str(request.AffectedSOPClassUID)
        refusal = refusal_of(request)  # the data set was dropped while receiving (disk)
        status: StoreStatus
        entry: InstanceEntry | None
        if refusal is not None:
            status, reason, entry = StoreStatus.OUT_OF_RESOURCES, refusal, None
        else:
            status, reason, entry = self.admit_instance(path, command_sop_uid, command_sop_class,
                                                        assoc_id)
        if status == StoreStatus.SUCCESS and entry is not None:
            pipeline = self.settings.pipeline_of_called_ae(str(event.assoc.acceptor.ae_title))
            entry = replace(entry, calling_ae=str(event.assoc.requestor.ae_title).strip(),
                            pipeline="" if pipeline is None or pipeline.implicit else pipeline.name)
            if pipeline is not None and entry.sop_class_uid not in self._sop_classes(pipeline):
                # Refused at negotiation already; this catches a command that names one class on
                # a context negotiated for another.
                return self._refuse_sop_class(path, entry, assoc_id)
        if status == StoreStatus.SUCCESS and entry is not None:
            try:
                self.committer.commit(path, entry)
            except OSError as error:
                status = StoreStatus.OUT_OF_RESOURCES
                reason = f"write_failed:{error.strerror or error}"
        if status != StoreStatus.SUCCESS or entry is None:
            path.unlink(missing_ok=True)
            metrics.INSTANCES_REJECTED.labels(status=status.hex).inc()
            loggable_sop_uid = _loggable_uid(command_sop_uid)
            log.warning(
                "instance_rejected",
                association_id=assoc_id,
                status=status.hex,
                reason=reason,
                sop_class_uid=command_sop_class,
                sop_uid=loggable_sop_uid,
            )
            self.audit.record(
                "instance_rejected",
                association=assoc_id,
                sop_class_uid=_loggable_uid(command_sop_class),
                sop_instance_uid=loggable_sop_uid,
                status=status.hex,
                reason=reason,
            )
            return status
        self.tracker.add(assoc_id, study_key(entry.study_uid, entry.pipeline))
        metrics.INSTANCES_RECEIVED.labels(calling_ae=entry.calling_ae).inc()
        metrics.RECEIVED_BYTES.labels(calling_ae=entry.calling_ae).inc(entry.size_bytes)
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
            status=StoreStatus.SUCCESS.hex,
        )
        return StoreStatus.SUCCESS

    def _refuse_sop_class(self, path: Path, entry: InstanceEntry, assoc_id: str) -> int:
        """0x0122: the called AE title's pipeline does not take this SOP class."""
        path.unlink(missing_ok=True)
        status = f"0x{SOP_CLASS_NOT_SUPPORTED:04X}"
        reason = "sop_class_not_in_pipeline"
        metrics.INSTANCES_REJECTED.labels(status=status).inc()
        log.warning("instance_rejected", association_id=assoc_id, status=status, reason=reason,
                    sop_class_uid=entry.sop_class_uid, sop_uid=entry.sop_uid,
                    pipeline=entry.pipeline)
        self.audit.record("instance_rejected", association=assoc_id,
                          sop_class_uid=entry.sop_class_uid, sop_instance_uid=entry.sop_uid,
                          status=status, reason=reason)
        return SOP_CLASS_NOT_SUPPORTED

    def _sop_classes(self, pipeline: Pipeline) -> frozenset[str]:
        return frozenset(str(sop) for sop in storage_sop_classes_named(pipeline.sop_classes))

    def admit_instance(
        self, path: Path, command_sop_uid: str, command_sop_class: str, assoc_id: str
    ) -> tuple[StoreStatus, str, InstanceEntry | None]:
        """Check one received file; (status, reason, manifest entry when accepted)."""
        if self.spool.free_bytes() < self.settings.spool.min_free_bytes:
            return StoreStatus.OUT_OF_RESOURCES, "disk_below_watermark", None
        try:
            size_bytes = path.stat().st_size
            header, extent = validate.read_header(path, HEADER_TAGS)
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
        except Exception as error:  # any parse failure of a peer's bytes is "cannot understand"
            return StoreStatus.CANNOT_UNDERSTAND, f"unreadable_dataset:{type(error).__name__}", None
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
        return StoreStatus.SUCCESS, "", entry

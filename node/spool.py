"""The spool: the on-disk state machine that is the node's source of truth.

    tmp/                     chunked receive files while a C-STORE is in flight
    incoming/<study_key>/    instances of a study still arriving, plus manifest.jsonl
    queued/<run_id>/         a claimed study waiting for a worker (run.json; published.json once
                             the Celery message is out)
    work/<run_id>/           a worker holds it (flock on work/<run_id>/lock)
    done/<run_id>/           results delivered; record.json says what happened
    failed/<run_id>/         gave up; record.json says why

Every state change is an atomic rename inside one filesystem. Paths are never built from received
values: study and instance folders are named by a hash of their UID.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

RunState = Literal["queued", "work", "done", "failed"]
RUN_STATES: tuple[RunState, ...] = ("queued", "work", "done", "failed")
MANIFEST_NAME = "manifest.jsonl"
RUN_NAME = "run.json"
RECORD_NAME = "record.json"
PUBLISHED_NAME = "published.json"
LOCK_NAME = "lock"


@dataclass(frozen=True)
class InstanceEntry:
    """One received instance, as recorded in a study's manifest (no PHI: UIDs and header codes)."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    laterality: str  # "R", "L" or "" when the header gives none
    view: str  # ViewPosition, e.g. "CC", "MLO"; "" when absent
    file: str  # name inside the study folder
    size_bytes: int
    received_at: float  # wall clock, seconds since the epoch
    association_id: str

    @property
    def view_key(self) -> str:
        return f"{self.laterality}-{self.view}"


@dataclass(frozen=True)
class IncomingStudy:
    """What the completion watcher needs to know about a study still arriving."""

    study_key: str
    study_uid: str
    instances: tuple[InstanceEntry, ...]
    first_received_at: float
    last_received_at: float

    @property
    def view_keys(self) -> frozenset[str]:
        return frozenset(i.view_key for i in self.instances)


def hash_key(value: str) -> str:
    """A fixed-length, filesystem-safe name for a received value (never the value itself)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader sees the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_manifest(folder: Path) -> list[InstanceEntry]:
    """Manifest lines of a study or run folder; a repeated SOP Instance UID keeps its last line."""
    path = folder / MANIFEST_NAME
    entries: dict[str, InstanceEntry] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = InstanceEntry(**json.loads(line))
        except (ValueError, TypeError):
            continue  # a torn last line after a crash: the instance it described was never acked
        entries[entry.sop_uid] = entry
    return list(entries.values())


class Spool:
    """The spool folders and the atomic moves between them.

    One `serve` process owns incoming/ (a thread lock orders the C-STORE handlers against the
    completion watcher); workers in other processes meet in queued/ and work/ through renames
    and flocks, which are atomic across processes.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    # --- layout -------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    def state_dir(self, state: RunState) -> Path:
        return self.root / state

    def ensure(self) -> Spool:
        for sub in ("tmp", "incoming", *RUN_STATES):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def purge_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove leftovers of C-STOREs that never completed (aborted associations, crashes)."""
        removed = 0
        cutoff = time.time() - older_than_s
        for path in self.tmp_dir.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- receiving ----------------------------------------------------------------------------
    def add_instance(self, received_path: Path, entry: InstanceEntry) -> Path:
        """Make a received file durable in incoming/<study_key>/ and record it in the manifest.

        The file is fsynced before the rename and the manifest line after it, so an instance we
        acknowledged survives a crash; a crash in between leaves a file without a manifest line
        that was never acknowledged.
        """
        study_key = hash_key(entry.study_uid)
        _fsync_file(received_path)
        with self._lock:
            folder = self.incoming_dir / study_key
            folder.mkdir(exist_ok=True)
            target = folder / entry.file
            os.replace(received_path, target)
            line = json.dumps(asdict(entry), sort_keys=True) + "\n"
            with open(folder / MANIFEST_NAME, "a", encoding="utf-8") as manifest:
                manifest.write(line)
                manifest.flush()
                os.fsync(manifest.fileno())
            _fsync_dir(folder)
        return target

    def incoming_studies(self) -> list[IncomingStudy]:
        studies = []
        for folder in sorted(self.incoming_dir.iterdir()):
            entries = read_manifest(folder)
            if not entries:
                continue
            times = [e.received_at for e in entries]
            studies.append(
                IncomingStudy(
                    study_key=folder.name,
                    study_uid=entries[0].study_uid,
                    instances=tuple(entries),
                    first_received_at=min(times),
                    last_received_at=max(times),
                )
            )
        return studies

    def claim_study(self, study_key: str, reason: str) -> str:
        """Move a study from incoming/ to queued/<run_id>/: from now on it is a run."""
        run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{study_key[:12]}-{uuid.uuid4().hex[:6]}"
        with self._lock:
            source = self.incoming_dir / study_key
            target = self.state_dir("queued") / run_id
            entries = read_manifest(source)
            os.rename(source, target)
            _fsync_dir(self.incoming_dir)
            _fsync_dir(target.parent)
        write_json_atomic(
            target / RUN_NAME,
            {
                "run_id": run_id,
                "study_uid": entries[0].study_uid if entries else "",
                "study_key": study_key,
                "claimed_at": time.time(),
                "completion_reason": reason,
                "instance_count": len(entries),
            },
        )
        return run_id

    # --- runs ---------------------------------------------------------------------------------
    def locate(self, run_id: str) -> tuple[RunState, Path] | None:
        if not _is_run_id(run_id):
            return None
        for state in RUN_STATES:
            path = self.state_dir(state) / run_id
            if path.is_dir():
                return state, path
        return None

    def runs(self, state: RunState) -> list[str]:
        return sorted(p.name for p in self.state_dir(state).iterdir() if p.is_dir())

    def mark_published(self, run_id: str) -> None:
        located = self.locate(run_id)
        if located and located[0] == "queued":
            write_json_atomic(located[1] / PUBLISHED_NAME, {"published_at": time.time()})

    def unpublished_runs(self) -> list[str]:
        queued = self.state_dir("queued")
        return [r for r in self.runs("queued") if not (queued / r / PUBLISHED_NAME).exists()]

    @contextmanager
    def hold_run(self, run_id: str) -> Iterator[Path | None]:
        """Claim a run for this worker process, or yield None if it is not ours to process.

        queued/ -> work/ by rename; the flock on work/<run_id>/lock marks a live owner. A run in
        work/ whose lock is free was abandoned by a dead worker (its message was redelivered), so
        it is taken over. A run already done/ or failed/ is a duplicate delivery: None.
        """
        queued = self.state_dir("queued") / run_id
        work = self.state_dir("work") / run_id
        if not _is_run_id(run_id):
            yield None
            return
        try:
            os.rename(queued, work)
        except FileNotFoundError:
            if not work.is_dir():
                yield None
                return
        lock_handle: IO[str] = open(work / LOCK_NAME, "a")  # noqa: SIM115 - held for the block
        try:
            try:
                fcntl.flock(lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield work
        finally:
            lock_handle.close()

    def finish_run(self, run_id: str, state: Literal["done", "failed"]) -> Path:
        source = self.state_dir("work") / run_id
        target = self.state_dir(state) / run_id
        os.rename(source, target)
        _fsync_dir(target.parent)
        return target

    def requeue_run(self, run_id: str) -> Path:
        """Put a failed run back in queued/ (IT's `runs retry`), unpublished so it is sent again."""
        located = self.locate(run_id)
        if located is None:
            raise FileNotFoundError(run_id)
        state, path = located
        if state not in ("failed", "done"):
            raise ValueError(f"run {run_id} is {state}, not failed or done")
        target = self.state_dir("queued") / run_id
        (path / PUBLISHED_NAME).unlink(missing_ok=True)
        os.rename(path, target)
        return target


def _is_run_id(value: str) -> bool:
    return bool(value) and len(value) <= 80 and all(c.isalnum() or c in "-T" for c in value)

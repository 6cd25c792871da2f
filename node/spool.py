"""The spool: the on-disk state machine that is the node's source of truth.

    tmp/                     chunked receive files while a C-STORE is in flight
    incoming/<study_key>/    instances of a study still arriving, plus manifest.jsonl
    queued/<run_id>/         a claimed study waiting for a worker (run.json; published.json once
                             the Celery message is out)
    work/<run_id>/           a worker holds it (flock on work/<run_id>/lock; with
                             `claims.mode: redis` also a Redis lease, node/leases.py)
    done/<run_id>/           results delivered; record.json says what happened
    failed/<run_id>/         gave up; record.json says why
    discarded/<run_id>/      IT discarded it (`mammo-node runs discard`); discarded.json says when

Every state change is an atomic rename inside one filesystem. Paths are never built from received
values: study and instance folders are named by a hash of their UID.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from node.runs import (
    DISCARDED_NAME,
    PREVIOUS_RECORD_NAME,
    PUBLISHED_NAME,
    RECORD_NAME,
    SUPERSEDED_NAME,
    DiscardedNote,
    InstanceEntry,
    PublishedNote,
    RunInfo,
    RunRecord,
    SupersededNote,
    append_manifest,
    clear_sent,
    fsync_dir,
    fsync_file,
    read_manifest,
    read_published,
    read_record,
    read_run_info,
    read_superseded,
    write_discarded,
    write_published,
    write_record,
    write_run_info,
    write_superseded,
)

RunState = Literal["queued", "work", "done", "failed", "discarded"]
RUN_STATES: tuple[RunState, ...] = ("queued", "work", "done", "failed", "discarded")
FINISHED_STATES: tuple[RunState, ...] = ("done", "failed", "discarded")  # what retention purges
# Runs whose instances a later run of the same study takes over (see `claim_study`).
UNION_STATES: tuple[RunState, ...] = ("queued", "work", "done", "failed")
LOCK_NAME = "lock"


class RunStateError(ValueError):
    """A run is not in a state that allows the operation (e.g. discarding a run being worked on)."""


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

    @property
    def pipeline(self) -> str:
        """The pipeline its instances came in by ("": the implicit one)."""
        return self.instances[0].pipeline if self.instances else ""


def hash_key(value: str) -> str:
    """A fixed-length, filesystem-safe name for a received value (never the value itself)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


def study_key(study_uid: str, pipeline: str = "") -> str:
    """The folder name of a study in incoming/ (and in its run ids): per pipeline, so the same
    study sent to two called AE titles makes two runs; the implicit pipeline's is the hash of
    the study UID alone, as it always was."""
    return hash_key(f"{pipeline}\\{study_uid}" if pipeline else study_uid)


def free_bytes(directory: Path) -> int:
    """Free space for the spool; 0 when it cannot be read (an unreachable spool is as good as
    full: the listener refuses with "out of resources" rather than failing the C-STORE)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


class Spool:
    """The spool folders and the atomic moves between them.

    One `serve` process owns incoming/ (a thread lock orders the C-STORE handlers against the
    completion watcher); workers in other processes meet in queued/ and work/ through renames
    and flocks, which are atomic across processes.

    Because incoming/ has a single owner, the spool keeps an index of it in memory (study key ->
    SOP Instance UID -> entry): `add_instance` adds to it, `claim_study` removes from it, and the
    completion watcher reads it on every tick instead of parsing every manifest. The index is
    built from the manifests on first use, so a restarted node recovers what it had received.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._incoming: dict[str, dict[str, InstanceEntry]] | None = None  # None: not built yet
        self._replaced: list[Path] = []  # earlier copies of resent instances (`add_instances`)
        # fsyncs of a group at once (`add_instances`); threads start on the first group
        self._fsyncs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")

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
        return free_bytes(self.root)

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
        """Make one received file durable in incoming/<study_key>/ with its manifest line
        (`add_instances` for one); raises the OSError that kept it from being recorded."""
        outcome = self.add_instances([(received_path, entry)])[0]
        self.drop_replaced()
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def add_instances(self, received: Sequence[tuple[Path, InstanceEntry]]
                      ) -> list[Path | OSError]:
        """Make received files durable in incoming/<study_key>/ and record them in their
        manifests, as one group commit; per instance, its path in the spool or the OSError that
        kept it from being recorded. Only an instance that got a path may be acknowledged.

        Each file is fsynced before it is renamed into its study folder; then each folder gets
        its manifest lines in one append and one fsync, and an fsync of the folder (and of
        incoming/ for a folder this commit created). So an acknowledged instance survives a
        crash, and a crash part way leaves files without manifest lines, never acknowledged.
        The fsyncs of each of the two steps are issued at once, from a few threads, so that the
        filesystem serves them with shared journal commits (one after the other, each pays a
        commit of its own): instances received together by concurrent associations share them.

        A file that replaces an earlier copy of the same instance (a resend) is swapped in by one
        rename; the earlier copy keeps a link under tmp/ until `drop_replaced`, so freeing its
        blocks is not part of the commit (tmp/ is purged at start, should a crash come first).
        """
        outcomes: list[Path | OSError | None] = list(
            self._at_once([functools.partial(fsync_file, path) for path, _ in received]))
        with self._lock:
            by_folder: dict[Path, list[int]] = {}
            created: set[Path] = set()
            for number, (path, entry) in enumerate(received):
                if outcomes[number] is not None:
                    continue
                folder = self.incoming_dir / study_key(entry.study_uid, entry.pipeline)
                try:
                    if not folder.is_dir():
                        folder.mkdir(exist_ok=True)
                        created.add(folder)
                    self._swap_in(path, folder / entry.file)
                except OSError as error:
                    outcomes[number] = error
                    continue
                by_folder.setdefault(folder, []).append(number)
            # The renames, the manifest lines and new folders, durable together: no order among
            # them matters (the files are durable already), so their fsyncs go out at once.
            folders = list(by_folder)
            calls = [functools.partial(append_manifest, folder,
                                       [received[number][1] for number in by_folder[folder]])
                     for folder in folders]
            calls += [functools.partial(fsync_dir, folder) for folder in folders]
            if created:
                calls.append(functools.partial(fsync_dir, self.incoming_dir))
            done = self._at_once(calls)
            new_folders_failure = done[-1] if created else None
            for index, folder in enumerate(folders):
                failure = (done[index] or done[len(folders) + index]
                           or (new_folders_failure if folder in created else None))
                for number in by_folder[folder]:
                    entry = received[number][1]
                    outcomes[number] = failure if failure is not None else folder / entry.file
                    if failure is None and self._incoming is not None:
                        self._incoming.setdefault(folder.name, {})[entry.sop_uid] = entry
        return [outcome if outcome is not None else OSError("not recorded")
                for outcome in outcomes]

    def _at_once(self, calls: Sequence[Callable[[], None]]) -> list[OSError | None]:
        """Make the calls (fsyncs) on several threads at once when there are several: fsyncs
        issued together share the filesystem's journal commits, where one after the other each
        pays its own. The OSError of each, or None."""
        def attempt(call: Callable[[], None]) -> OSError | None:
            try:
                call()
            except OSError as error:
                return error
            return None

        if len(calls) <= 1:
            return [attempt(call) for call in calls]
        return list(self._fsyncs.map(attempt, calls))

    def _swap_in(self, path: Path, target: Path) -> None:
        """Rename a received file to `target`; an earlier copy there stays linked under tmp/ until
        `drop_replaced` (the caller holds the lock)."""
        kept = self.tmp_dir / f"replaced-{uuid.uuid4().hex}.dcm"
        try:
            os.link(target, kept)
        except OSError:  # nothing there yet (or no tmp/): the rename does it all
            os.replace(path, target)
            return
        try:
            os.replace(path, target)
        except OSError:
            kept.unlink(missing_ok=True)
            raise
        self._replaced.append(kept)

    def drop_replaced(self) -> int:
        """Delete the earlier copies that commits replaced (after their commit, off the sender's
        wait); how many. The deletions are committed here too (fsync of tmp/), so that freeing
        their blocks (and discarding them, on a filesystem mounted with `discard`) is not left
        to the next instance's commit."""
        with self._lock:
            replaced, self._replaced = self._replaced, []
        for path in replaced:
            path.unlink(missing_ok=True)
        if replaced:
            fsync_dir(self.tmp_dir)
        return len(replaced)

    def index_incoming(self) -> int:
        """(Re)build the index of incoming/ from the manifests on disk; the number of studies."""
        with self._lock:
            self._incoming = None
            return len(self._incoming_index())

    def _incoming_index(self) -> dict[str, dict[str, InstanceEntry]]:
        """The index, built from disk on first use (the caller holds the lock)."""
        if self._incoming is None:
            index = {}
            for folder in self.incoming_dir.iterdir():
                entries = read_manifest(folder) if folder.is_dir() else ()
                if entries:
                    index[folder.name] = {e.sop_uid: e for e in entries}
            self._incoming = index
        return self._incoming

    def incoming_studies(self) -> list[IncomingStudy]:
        """Studies still arriving, by study key (from the index: no file is read)."""
        with self._lock:
            index = {key: tuple(by_sop.values()) for key, by_sop in self._incoming_index().items()}
        studies = []
        for study_key, entries in sorted(index.items()):
            times = [e.received_at for e in entries]
            studies.append(
                IncomingStudy(
                    study_key=study_key,
                    study_uid=entries[0].study_uid,
                    instances=entries,
                    first_received_at=min(times),
                    last_received_at=max(times),
                )
            )
        return studies

    def claim_study(self, study_key: str, reason: str) -> str:
        """Move a study from incoming/ to queued/<run_id>/: from now on it is a run.

        Late-instance policy: when earlier runs of the same study exist (an instance arrived after
        the study was claimed, or the study was sent again), the new run takes over their
        instances (hard links, same filesystem) so it is scored on the union, and it supersedes
        them: run.json lists `supersedes`, each earlier run gets `superseded.json` (and its
        record `superseded_by`). run.json is written before the rename, so a claimed run always
        has one.
        """
        run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{study_key[:12]}-{uuid.uuid4().hex[:6]}"
        with self._lock:
            source = self.incoming_dir / study_key
            target = self.state_dir("queued") / run_id
            received = tuple(self._incoming_index().get(study_key, {}).values())
            try:
                taken, supersedes = self._take_over_earlier_runs(
                    source, study_key, {e.sop_uid for e in received})
                entries = received + taken
                write_run_info(source, RunInfo(
                    run_id=run_id,
                    study_uid=entries[0].study_uid if entries else "",
                    study_key=study_key,
                    claimed_at=time.time(),
                    completion_reason=reason,
                    instance_count=len(entries),
                    supersedes=supersedes,
                    pipeline=(entries[0].pipeline or None) if entries else None,
                ))
                os.rename(source, target)
            except BaseException:
                self._incoming = None  # the folder may have changed: rebuild from disk
                raise
            self._incoming_index().pop(study_key, None)
            fsync_dir(self.incoming_dir)
            fsync_dir(target.parent)
        for earlier in supersedes:
            self.mark_superseded(earlier, run_id)
        return run_id

    def runs_of_study(self, study_key: str, states: tuple[RunState, ...] = UNION_STATES
                      ) -> list[tuple[RunState, str]]:
        """Runs of one study (by the study key in their id, confirmed by run.json), oldest first."""
        found = []
        for state in states:
            for run_id in self.runs(state):
                if f"-{study_key[:12]}-" not in run_id:
                    continue
                info = read_run_info(self.state_dir(state) / run_id)
                if info is not None and info.study_key == study_key:
                    found.append((state, run_id))
        return sorted(found, key=lambda item: item[1])

    def _take_over_earlier_runs(self, folder: Path, study_key: str, present: set[str]
                                ) -> tuple[tuple[InstanceEntry, ...], tuple[str, ...]]:
        """Link the instances of earlier runs of the study into `folder` (whose manifest has the
        SOP Instance UIDs `present`): the entries taken, and the ids of the runs superseded."""
        present = set(present)
        all_taken: list[InstanceEntry] = []
        superseded = []
        for _, run_id in self.runs_of_study(study_key):
            for _ in range(5):  # a worker may move the run between our look and our link
                located = self.locate(run_id)
                if located is None:
                    break
                path = located[1]
                taken: list[InstanceEntry] = []
                moved = False
                for entry in read_manifest(path):
                    if entry.sop_uid in present:
                        continue  # the newer copy of an instance wins
                    target = folder / entry.file
                    try:
                        if not target.exists():
                            os.link(path / entry.file, target)
                    except FileNotFoundError:
                        moved = self.locate(run_id) != located
                        if moved:
                            break  # take it again from where it is now
                        continue  # a file missing from a run that stayed put: take the rest
                    taken.append(entry)
                if moved:
                    continue
                append_manifest(folder, taken)
                present |= {e.sop_uid for e in taken}
                all_taken += taken
                if not (path / SUPERSEDED_NAME).exists():
                    superseded.append(run_id)
                break
        fsync_dir(folder)
        return tuple(all_taken), tuple(superseded)

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
        folder = self.state_dir(state)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    def run_info(self, run_id: str) -> RunInfo | None:
        """run.json of a run wherever it is (None when unknown)."""
        located = self.locate(run_id)
        return read_run_info(located[1]) if located else None

    def mark_published(self, run_id: str) -> None:
        located = self.locate(run_id)
        if located and located[0] == "queued":
            try:
                write_published(located[1], PublishedNote(published_at=time.time()))
            except FileNotFoundError:
                pass  # a worker took it meanwhile: the message did its job

    def published_at(self, run_id: str) -> float | None:
        """When the run's message was published, or None (never, or requeued since)."""
        note = read_published(self.state_dir("queued") / run_id)
        return note.published_at if note is not None else None

    def unpublish(self, run_id: str) -> None:
        """Forget that a queued run was published, so the watcher publishes it again."""
        (self.state_dir("queued") / run_id / PUBLISHED_NAME).unlink(missing_ok=True)

    def unpublished_runs(self) -> list[str]:
        queued = self.state_dir("queued")
        return [r for r in self.runs("queued") if not (queued / r / PUBLISHED_NAME).exists()]

    @contextmanager
    def hold_run(self, run_id: str) -> Iterator[Path | None]:
        """Claim a run for this worker process, or yield None if it is not ours to process.

        queued/ -> work/ by rename; the flock on work/<run_id>/lock marks a live owner. A run in
        work/ whose lock is free was abandoned by a dead worker (its message was redelivered), so
        it is taken over. A run already done/ or failed/ is a duplicate delivery: None. So is a
        run the reconciler moved back to queued/ while we reached for its lock (checked by inode
        after locking): its new message will bring it back.
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
        try:
            lock_handle: IO[str] = open(work / LOCK_NAME, "a")  # noqa: SIM115 - held for the block
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not _same_file(lock_handle, work / LOCK_NAME):
                yield None
                return
            yield work
        finally:
            lock_handle.close()

    @contextmanager
    def lock_if_free(self, run_id: str, state: RunState = "work") -> Iterator[Path | None]:
        """Take a run's flock without waiting (the reconciler and IT commands); None if held."""
        path = self.state_dir(state) / run_id
        try:
            handle: IO[str] = open(path / LOCK_NAME, "a")  # noqa: SIM115 - held for the block
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield path if _same_file(handle, path / LOCK_NAME) else None
        finally:
            handle.close()

    def finish_run(self, run_id: str, state: Literal["done", "failed"]) -> Path:
        source = self.state_dir("work") / run_id
        target = self.state_dir(state) / run_id
        os.rename(source, target)
        fsync_dir(target.parent)
        # A later run may have superseded this one while it was being scored.
        marker = read_superseded(target)
        if marker is not None:
            _note_in_record(target, marker.superseded_by)
        return target

    def requeue_abandoned(self, run_id: str) -> bool:
        """work/ -> queued/ (unpublished) for a run whose lock is free; False if someone holds it.

        The attempts counter in run.json is kept, so a study that kills every worker that takes
        it ends in failed/ after `scoring.max_attempts`.
        """
        with self.lock_if_free(run_id) as path:
            if path is None:
                return False
            target = self.state_dir("queued") / run_id
            (path / PUBLISHED_NAME).unlink(missing_ok=True)
            os.rename(path, target)
            fsync_dir(target.parent)
            return True

    def fail_abandoned(self, run_id: str, record: RunRecord) -> bool:
        """work/ -> failed/ with `record` for a run whose lock is free; False if someone holds it."""
        with self.lock_if_free(run_id) as path:
            if path is None:
                return False
            write_record(path, record)
            self.finish_run(run_id, "failed")
            return True

    def mark_superseded(self, run_id: str, by_run_id: str) -> None:
        """Say in an earlier run that `by_run_id` replaces it (marker, and its record if finished)."""
        for _ in range(5):  # the run may move between states while we write
            located = self.locate(run_id)
            if located is None:
                return
            state, path = located
            try:
                write_superseded(path, SupersededNote(superseded_by=by_run_id, at=time.time()))
                if state in ("done", "failed", "discarded"):
                    _note_in_record(path, by_run_id)
            except FileNotFoundError:
                continue
            if self.locate(run_id) == located:
                return

    def superseded_by(self, run_id: str) -> str | None:
        located = self.locate(run_id)
        if located is None:
            return None
        note = read_superseded(located[1])
        return note.superseded_by if note is not None else None

    def requeue_run(self, run_id: str, reset_attempts: bool = True) -> Path:
        """Put a finished run back in queued/ (IT's `runs retry`), unpublished so it is sent again.

        The attempts counter starts again (IT decided the cause is gone); the previous record is
        kept as record.previous.json. A superseded run is refused: retry the run that replaced it.
        A run that succeeded forgets what it sent (it is sent in full again: its operator wants
        it resent); a failed one keeps it, so the retry sends only what was not stored.
        """
        located = self.locate(run_id)
        if located is None:
            raise FileNotFoundError(run_id)
        state, path = located
        if state not in ("failed", "done", "discarded"):
            raise RunStateError(f"run {run_id} is {state}, not failed, done or discarded")
        superseded = read_superseded(path)
        if superseded is not None:
            raise RunStateError(f"run {run_id} is superseded by {superseded.superseded_by}: "
                                "retry that one")
        target = self.state_dir("queued") / run_id
        (path / PUBLISHED_NAME).unlink(missing_ok=True)
        (path / DISCARDED_NAME).unlink(missing_ok=True)
        if state == "done":
            clear_sent(path)
        if (path / RECORD_NAME).exists():
            os.replace(path / RECORD_NAME, path / PREVIOUS_RECORD_NAME)
        if reset_attempts:
            info = read_run_info(path)
            if info is not None:
                write_run_info(path, info.model_copy(update={"attempts": 0,
                                                             "requeued_at": time.time()}))
        os.rename(path, target)
        fsync_dir(target.parent)
        return target

    def discard_run(self, run_id: str, reason: str = "") -> tuple[RunState, Path]:
        """queued/ or failed/ (or an abandoned work/) -> discarded/; RunStateError while worked on."""
        located = self.locate(run_id)
        if located is None:
            raise FileNotFoundError(run_id)
        state, path = located
        target = self.state_dir("discarded") / run_id
        if state == "work":
            with self.lock_if_free(run_id) as held:
                if held is None:
                    raise RunStateError(f"run {run_id} is being worked on: try again when it is done")
                write_discarded(held, DiscardedNote(discarded_at=time.time(), from_state=state,
                                                    reason=reason))
                os.rename(held, target)
        elif state in ("queued", "failed"):
            try:
                write_discarded(path, DiscardedNote(discarded_at=time.time(), from_state=state,
                                                    reason=reason))
                os.rename(path, target)
            except FileNotFoundError:
                moved = self.locate(run_id)
                if moved is not None:
                    (moved[1] / DISCARDED_NAME).unlink(missing_ok=True)
                raise RunStateError(f"run {run_id} was taken by a worker meanwhile") from None
        else:
            raise RunStateError(f"run {run_id} is {state}: only queued or failed runs are discarded")
        fsync_dir(target.parent)
        return state, target

    def finished_at(self, state: RunState, run_id: str) -> float:
        """When a finished run got where it is: its record or discard note, else the folder."""
        path = self.state_dir(state) / run_id
        for name in (DISCARDED_NAME, RECORD_NAME):
            try:
                return (path / name).stat().st_mtime
            except FileNotFoundError:
                continue
        return path.stat().st_mtime

    def purge_finished(self, older_than_s: float, now: float | None = None
                       ) -> list[dict[str, str]]:
        """Remove done/, failed/ and discarded/ runs (with their instances) older than the limit.

        Never queued/ or work/. Each run is first renamed out of its state folder (atomic), so a
        concurrent `runs retry` either wins or finds nothing; then the folder is deleted.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        for leftover in self.tmp_dir.glob("purge-*"):  # a purge a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        purged = []
        for state in FINISHED_STATES:
            for run_id in self.runs(state):
                try:
                    if self.finished_at(state, run_id) > cutoff:
                        continue
                except FileNotFoundError:
                    continue
                path = self.state_dir(state) / run_id
                info = read_run_info(path)
                doomed = self.tmp_dir / f"purge-{run_id}"
                try:
                    os.rename(path, doomed)
                except FileNotFoundError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
                purged.append({"run_id": run_id, "state": state,
                               "study_uid": info.study_uid if info is not None else ""})
        return purged


def _note_in_record(run_dir: Path, by_run_id: str) -> None:
    record = read_record(run_dir)
    if record is not None and record.superseded_by != by_run_id:
        write_record(run_dir, record.model_copy(update={"superseded_by": by_run_id}))


def _same_file(handle: IO[str], path: Path) -> bool:
    """Is the open handle still the file at `path` (the folder was not moved under us)?"""
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _is_run_id(value: str) -> bool:
    return bool(value) and len(value) <= 80 and all(c.isalnum() or c in "-T" for c in value)

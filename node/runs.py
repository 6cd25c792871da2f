"""The files of a run, typed: the one reader and the one writer of each.

A run folder (incoming/<study_key>/ while a study arrives, then <state>/<run_id>/) holds:

    manifest.jsonl   one `InstanceEntry` per line, appended as instances arrive
    run.json         `RunInfo`: the claim (who, when, why) and the attempts counter
    record.json      `RunRecord`: what happened (scores, outputs, sends, or why it failed)
    published.json   `PublishedNote`: the run's Celery message is out
    superseded.json  `SupersededNote`: a later run of the same study replaced this one
    discarded.json   `DiscardedNote`: IT discarded the run
    sent.jsonl       one line per result object a destination confirmed storing, appended as
                     each is stored, so an attempt that follows one that died mid-send (a
                     killed worker, a lost host) does not send those objects again

No other module opens these files: node/spool.py moves folders between states and calls the
functions here; the worker and the CLI get typed records from the spool. Every JSON file is
replaced atomically and fsynced (a reader sees the old or the new content, never half); manifest
lines are appended and fsynced. The JSON keys are those every earlier version wrote, so runs
already on disk load unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

MANIFEST_NAME = "manifest.jsonl"
RUN_NAME = "run.json"
RECORD_NAME = "record.json"
PREVIOUS_RECORD_NAME = "record.previous.json"  # the record a `runs retry` set aside
PUBLISHED_NAME = "published.json"
SUPERSEDED_NAME = "superseded.json"
DISCARDED_NAME = "discarded.json"
SENT_NAME = "sent.jsonl"

_Model = TypeVar("_Model", bound="BaseModel")


# --- durability ---------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no wait


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes of an open file from `offset` to disk now, without waiting
    for them (Linux: sync_file_range WRITE; elsewhere nothing). Not a durability step, only
    `fsync` is one: it lets the fsync at the end of a large receive find most of the file
    written already, instead of starting the whole write then."""
    function = _sync_file_range()
    if function is not None and length > 0:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON so a reader sees the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when it is absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- manifest -----------------------------------------------------------------------------------
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
    calling_ae: str = ""  # who sent it (not PHI); "" in manifests written before it was kept
    # The pipeline of the called AE title (settings `pipelines`); "": the implicit one (and
    # every manifest written before pipelines existed). Not written when "".
    pipeline: str = ""

    @property
    def view_key(self) -> str:
        return f"{self.laterality}-{self.view}"


def read_manifest(folder: Path) -> tuple[InstanceEntry, ...]:
    """Manifest lines of a study or run folder; a repeated SOP Instance UID keeps its last line."""
    entries: dict[str, InstanceEntry] = {}
    try:
        lines = (folder / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return ()
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = InstanceEntry(**json.loads(line))
        except (ValueError, TypeError):
            continue  # a torn last line after a crash: the instance it described was never acked
        entries[entry.sop_uid] = entry
    return tuple(entries.values())


def _entry_fields(entry: InstanceEntry) -> dict[str, Any]:
    fields = asdict(entry)
    if not entry.pipeline:
        del fields["pipeline"]  # the implicit pipeline: lines as they always were
    return fields


def append_manifest(folder: Path, entries: Iterable[InstanceEntry]) -> None:
    """Append one line per entry and fsync it (the caller fsyncs the folder for new names)."""
    lines = [json.dumps(_entry_fields(entry), sort_keys=True) + "\n" for entry in entries]
    if not lines:
        return
    with open(folder / MANIFEST_NAME, "a", encoding="utf-8") as manifest:
        manifest.writelines(lines)
        manifest.flush()
        os.fsync(manifest.fileno())


# --- the send journal ---------------------------------------------------------------------------
def append_sent(folder: Path, destination: str, sop_uid: str, status: str | None) -> None:
    """Note that `destination` confirmed storing `sop_uid` (with `status`): one line, written by
    one O_APPEND write and fsynced, so the destinations' threads (and, with leases on a shared
    spool, a worker that lost the run) never interleave within a line."""
    line = json.dumps({"destination": destination, "sop_uid": sop_uid, "status": status},
                      sort_keys=True) + "\n"
    fd = os.open(folder / SENT_NAME, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line  # after a line a crash tore: start a line of our own
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_sent(folder: Path) -> dict[tuple[str, str], str | None]:
    """(destination, SOP Instance UID) -> status of each object the journal says was stored."""
    try:
        lines = (folder / SENT_NAME).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    sent: dict[tuple[str, str], str | None] = {}
    for line in lines:
        try:
            item = json.loads(line)
            key = (str(item["destination"]), str(item["sop_uid"]))
            status = item.get("status")
        except (ValueError, TypeError, KeyError):
            continue  # a torn last line after a crash: that object is sent again
        sent[key] = None if status is None else str(status)
    return sent


def clear_sent(folder: Path) -> None:
    """Forget what was sent (a `runs retry` of a run that succeeded: it is sent in full)."""
    (folder / SENT_NAME).unlink(missing_ok=True)


# --- JSON records -------------------------------------------------------------------------------
class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _OmitNone(_Frozen):
    """Optional fields that are None stay out of the file, as they always have."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class RunInfo(_OmitNone):
    """run.json: written at the claim, before the study folder becomes a run."""

    run_id: str
    study_uid: str
    study_key: str
    claimed_at: float  # wall clock, seconds since the epoch
    completion_reason: str  # node.completion: "views_complete", "quiet_period" or "deadline"
    instance_count: int
    supersedes: tuple[str, ...] = ()  # earlier runs of the study whose instances this one took
    attempts: int = 0  # worker attempts started; counts the ones a dead worker never finished
    requeued_at: float | None = None  # set by `runs retry`
    pipeline: str | None = None  # the called AE title's pipeline; None: the implicit one


class FailureKind(StrEnum):
    """Why a run ended in failed/; it tells IT what to do about it."""

    INPUT = "input"  # the study cannot be scored (bad pixels, no usable view, poison): fix the input
    SEND = "send"  # results written, a destination did not store them: retry once it is back
    INTERNAL = "internal"  # a bug: the run is parked, not lost


class RunFailure(_Frozen):
    """The typed reason of a failed run. On disk: `error` ("<kind>: <message>") and `error_kind`."""

    kind: FailureKind
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def attempts_exhausted(attempts: int) -> RunFailure:
    """A study whose earlier attempts all died mid-run (a poison study killing its workers)."""
    return RunFailure(kind=FailureKind.INPUT,
                      message=f"gave up after {attempts} attempts that did not finish")


class ModelRef(_Frozen):
    name: str
    version: str


class InputDescription(_OmitNone):
    """One instance of the run in the record: its manifest entry (less the association and the
    calling AE) and fate."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    laterality: str
    view: str
    file: str
    size_bytes: int
    received_at: float
    scored: bool
    reason: str | None = None  # why it was not scored
    # pipelines/quality.py's flags (view_missing, implant_present, low_contrast, ...); absent in
    # records written before they existed and when the image has none
    quality_flags: tuple[str, ...] | None = None

    @classmethod
    def of(cls, entry: InstanceEntry, scored: bool, reason: str | None,
           quality_flags: tuple[str, ...] = ()) -> InputDescription:
        fields = asdict(entry)
        del fields["association_id"], fields["calling_ae"], fields["pipeline"]
        return cls(**fields, scored=scored, reason=reason, quality_flags=quality_flags or None)


class Scores(_Frozen):
    views: Mapping[str, float]  # by view key, e.g. "R-CC"
    breasts: Mapping[str, float]  # "R", "L"
    exam: float
    operating_point: float
    suspicious: bool
    # which of the bundle's points `operating_point` is (`model.operating_point`); records
    # written before the setting existed were taken at "balanced"
    operating_point_name: str = "balanced"


class OutputFile(_Frozen):
    """A result object the worker wrote (path relative to the run folder)."""

    # cad_sr: pipelines/cad_sr.py; sc: the Secondary Capture overlay (pipelines/overlay.py)
    kind: Literal["sr", "cad_sr", "seg", "sc"]
    file: str
    sop_uid: str
    series_uid: str


class SendResult(_Frozen):
    """One C-STORE of one result object to one destination."""

    destination: str
    file: str
    sop_uid: str
    status: str | None  # "0x0000"; None when no response came
    ok: bool
    # Why the destination would not take it (never offered; not retried), only when it would not.
    refused: str | None = Field(default=None, exclude_if=lambda value: value is None)
    # Stored by an earlier attempt of this run (before a `runs retry`, the same SOP Instance UID
    # to the same destination): not sent again; `status` is that attempt's.
    earlier: bool = Field(default=False, exclude_if=lambda value: not value)


class ShadowScores(_OmitNone):
    """What the shadow bundle made of the same views (never sent, never written as DICOM):
    its identity and scores, or why it has none (`error`; the live run is unaffected)."""

    model: ModelRef | None = None
    scores: Scores | None = None
    error: str | None = None
    duration_s: float | None = None


class RunRecord(_OmitNone):
    """record.json: the outcome of a finished run (done/ or failed/)."""

    run_id: str
    study_uid: str
    state: Literal["done", "failed"]
    completion_reason: str | None = None
    model: ModelRef | None = None
    attempts: int | None = None  # None: the run ended without an attempt (superseded while queued)
    timings_s: Mapping[str, float] | None = None
    supersedes: tuple[str, ...] | None = None
    superseded_by: str | None = None
    error: RunFailure | None = None
    not_scored: str | None = None  # done without scoring, and why
    not_sent: str | None = None  # scored and written, not sent on purpose, and why
    inputs: tuple[InputDescription, ...] | None = None
    scores: Scores | None = None
    missing_views: tuple[str, ...] | None = None
    outputs: tuple[OutputFile, ...] | None = None
    sends: tuple[SendResult, ...] | None = None
    pipeline: str | None = None  # the called AE title's pipeline; None: the implicit one
    shadow: ShadowScores | None = None  # the shadow bundle's scores, when the pipeline has one

    @model_validator(mode="before")
    @classmethod
    def _error_from_disk(cls, data: Any) -> Any:
        """`error` is stored as its text with `error_kind` beside it. Records written before
        `error_kind` existed carry the kind only as the text's prefix: read it from there."""
        if not isinstance(data, dict) or not isinstance(data.get("error"), str):
            return data
        data = dict(data)
        text: str = data.pop("error")
        kind = data.pop("error_kind", None) or next(
            (k.value for k in FailureKind if text.startswith(f"{k.value}: ")), FailureKind.INTERNAL)
        data["error"] = {"kind": kind, "message": text.removeprefix(f"{kind}: ")}
        return data

    @model_serializer(mode="wrap")
    def _error_to_disk(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = {k: v for k, v in handler(self).items() if v is not None}
        if self.error is not None:
            data["error"] = str(self.error)
            data["error_kind"] = self.error.kind.value
        return data


class PublishedNote(_Frozen):
    published_at: float


class SupersededNote(_Frozen):
    superseded_by: str
    at: float


class DiscardedNote(_Frozen):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    discarded_at: float
    from_state: str = Field(validation_alias="from", serialization_alias="from")
    reason: str


def _load(model: type[_Model], path: Path) -> _Model | None:
    data = _read_json(path)
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None  # not a file we wrote: treated like a missing one, as it always was


def _save(path: Path, record: BaseModel) -> None:
    _write_json_atomic(path, record.model_dump(mode="json", by_alias=True))


def read_run_info(folder: Path) -> RunInfo | None:
    return _load(RunInfo, folder / RUN_NAME)


def write_run_info(folder: Path, info: RunInfo) -> None:
    _save(folder / RUN_NAME, info)


def read_record(folder: Path, name: str = RECORD_NAME) -> RunRecord | None:
    """The run's record (`name=PREVIOUS_RECORD_NAME`: the one a retry set aside)."""
    return _load(RunRecord, folder / name)


def write_record(folder: Path, record: RunRecord) -> None:
    _save(folder / RECORD_NAME, record)


def read_published(folder: Path) -> PublishedNote | None:
    return _load(PublishedNote, folder / PUBLISHED_NAME)


def write_published(folder: Path, note: PublishedNote) -> None:
    _save(folder / PUBLISHED_NAME, note)


def read_superseded(folder: Path) -> SupersededNote | None:
    return _load(SupersededNote, folder / SUPERSEDED_NAME)


def write_superseded(folder: Path, note: SupersededNote) -> None:
    _save(folder / SUPERSEDED_NAME, note)


def write_discarded(folder: Path, note: DiscardedNote) -> None:
    _save(folder / DISCARDED_NAME, note)

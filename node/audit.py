"""The audit trail: one JSON object per line, appended, never rewritten.

In the spirit of DICOM PS3.15 A.5 (audit trail messages): who talked to us and what we decided
(association accepted or rejected and why), what we received, what we scored and what we sent.
Like the logs it never carries PHI: AE titles, addresses, UIDs, SOP classes, statuses, counts.

Each record is written with a single `write(2)` on a file opened with O_APPEND, so lines from the
listener threads, the watcher and the worker processes never interleave, and flushed to disk
(fsync) so a record survives a crash of the process that wrote it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

from node.logs import get_logger
from node.settings import Settings

log = get_logger("node.audit")

# The events we record; anything else is a programming error.
EVENTS = frozenset(
    {
        "association_accepted",
        "association_rejected",
        "association_aborted",
        "presentation_contexts_refused",
        "instance_received",
        "instance_rejected",
        "study_queued",
        "study_scored",
        "study_not_scored",
        "study_failed",
        "results_sent",
        "results_not_sent",
        "results_send_failed",
        "run_requeued",
        "run_retried",
        "run_discarded",
        "run_purged",
        "training_set_exported",
        "node_started",
        "node_stopped",
    }
)


class AuditLog:
    """Append-only JSON-lines audit file; safe across threads and processes."""

    def __init__(self, path: str | Path, source: str) -> None:
        self.path = Path(path)
        self.source = source  # "listener", "watcher", "worker", "cli"
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        """Append one event. Never raises: a failing audit write is logged, the work goes on."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        entry = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "source": self.source,
            **fields,
        }
        line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode("utf-8")
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as error:
            log.error("audit_write_failed", audit_event=event, error=error.strerror)


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """All records of an audit file (for tests and `mammo-node` tooling); [] when absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def open_audit(settings: Settings, source: str) -> AuditLog:
    """The node's audit log as configured (`Settings.audit_path`)."""
    return AuditLog(settings.audit_path, source)

"""The audit trail: one valid JSON line per event, appended across threads and processes."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from node.audit import AuditLog, open_audit, read_audit
from tests.support.settings import make_settings


def _write_many(path: str, source: str, count: int) -> None:
    log = AuditLog(path, source)
    for i in range(count):
        log.record("instance_received", index=i, padding="x" * 2000)


def test_records_are_appended_one_json_line_each(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "listener")
    log.record("association_accepted", calling_ae="MODALITY", host="127.0.0.1")
    log.record("association_rejected", calling_ae="STRANGER", reason="calling_ae_not_allowed")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "association_accepted" and first["source"] == "listener"
    assert first["calling_ae"] == "MODALITY"
    assert second["reason"] == "calling_ae_not_allowed"
    assert first["ts"] <= second["ts"]


def test_unknown_event_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audit event"):
        AuditLog(tmp_path / "a.jsonl", "cli").record("something_else")


def test_lines_never_interleave_across_threads_and_processes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    threads = [threading.Thread(target=_write_many, args=(str(path), f"t{i}", 50)) for i in range(4)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(path), f"p{i}", 50)) for i in range(2)]
    for worker in [*threads, *procs]:
        worker.start()
    for worker in [*threads, *procs]:
        worker.join(timeout=60)
    records = read_audit(path)
    assert len(records) == 6 * 50
    for source in [*(f"t{i}" for i in range(4)), *(f"p{i}" for i in range(2))]:
        indices = [r["index"] for r in records if r["source"] == source]
        assert indices == list(range(50))


def test_a_failing_write_does_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    AuditLog(blocker / "audit.jsonl", "worker").record("study_scored", run_id="r1")
    assert read_audit(blocker / "missing.jsonl") == []


def test_default_path_is_in_the_spool_and_config_can_move_it(tmp_path: Path) -> None:
    assert open_audit(make_settings(tmp_path), "cli").path == tmp_path / "spool" / "audit.jsonl"
    moved = make_settings(tmp_path, audit={"path": str(tmp_path / "elsewhere.jsonl")})
    assert open_audit(moved, "cli").path == tmp_path / "elsewhere.jsonl"

"""The typed run files: round trips, the format earlier versions wrote, immutability, error kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from node.runs import (
    RECORD_NAME,
    RUN_NAME,
    SENT_NAME,
    FailureKind,
    InputDescription,
    InstanceEntry,
    ModelRef,
    OutputFile,
    RunFailure,
    RunInfo,
    RunRecord,
    Scores,
    SendResult,
    append_manifest,
    append_sent,
    attempts_exhausted,
    clear_sent,
    read_manifest,
    read_record,
    read_run_info,
    read_sent,
    write_record,
    write_run_info,
)

ENTRY = InstanceEntry("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.3.9", "1.2.3",
                      "1.2.840.10008.1.2.1", "R", "CC", "abc.dcm", 1234, 1700000000.5, "assoc1")

# run.json and record.json exactly as the version before typed records wrote them.
OLD_RUN_JSON = {
    "claimed_at": 1700000031.25, "completion_reason": "views_complete", "instance_count": 1,
    "run_id": "20231114T221351-0123456789ab-a1b2c3", "study_key": "0123456789abcdef" * 2,
    "study_uid": "1.2.3", "supersedes": [], "attempts": 1,
}
OLD_RECORD_JSON = {
    "run_id": "20231114T221351-0123456789ab-a1b2c3", "study_uid": "1.2.3", "state": "failed",
    "completion_reason": "views_complete", "model": {"name": "mias-baseline", "version": "1.0"},
    "attempts": 1, "timings_s": {"queue": 0.2, "completion": 1.5, "decode": 0.1, "total": 3.0},
    "error": "send: pacs: 2 object(s) not stored after 5 attempts (status None)",
    "inputs": [{"sop_uid": "1.2.3.4", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.2",
                "series_uid": "1.2.3.9", "study_uid": "1.2.3",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1", "laterality": "R", "view": "CC",
                "file": "abc.dcm", "size_bytes": 1234, "received_at": 1700000000.5,
                "scored": True}],
    "scores": {"views": {"R-CC": 0.25}, "breasts": {"R": 0.25}, "exam": 0.25,
               "operating_point": 0.5, "suspicious": False},
    "missing_views": ["L-CC", "R-MLO", "L-MLO"],
    "outputs": [{"kind": "sr", "file": "outputs/sr.dcm", "sop_uid": "2.25.1", "series_uid": "2.25.2"}],
    "sends": [{"destination": "pacs", "file": "sr.dcm", "sop_uid": "", "status": None, "ok": False}],
}


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def test_run_and_record_written_by_the_previous_version_load_and_keep_their_keys(
    tmp_path: Path,
) -> None:
    _write_json(tmp_path / RUN_NAME, OLD_RUN_JSON)
    _write_json(tmp_path / RECORD_NAME, OLD_RECORD_JSON)
    info = read_run_info(tmp_path)
    record = read_record(tmp_path)
    assert info is not None and info.attempts == 1 and info.completion_reason == "views_complete"
    assert record is not None and record.sends is not None and record.sends[0].status is None
    # The kind was only the text's prefix then; it is a type now.
    assert record.error == RunFailure(
        kind=FailureKind.SEND, message="pacs: 2 object(s) not stored after 5 attempts (status None)")
    write_run_info(tmp_path, info)
    write_record(tmp_path, record)
    assert json.loads((tmp_path / RUN_NAME).read_text()) == OLD_RUN_JSON
    # before `model.operating_point` every verdict was taken at the bundle's balanced point
    assert json.loads((tmp_path / RECORD_NAME).read_text()) == {
        **OLD_RECORD_JSON, "error_kind": "send",
        "scores": {**OLD_RECORD_JSON["scores"], "operating_point_name": "balanced"}}


def test_records_round_trip(tmp_path: Path) -> None:
    info = RunInfo(run_id="r1", study_uid="1.2.3", study_key="k", claimed_at=5.0,
                   completion_reason="deadline", instance_count=1, supersedes=("r0",))
    record = RunRecord(
        run_id="r1", study_uid="1.2.3", state="done", completion_reason="deadline",
        model=ModelRef(name="m", version="1"), attempts=1, timings_s={"total": 1.0},
        supersedes=("r0",), inputs=(InputDescription.of(ENTRY, scored=False, reason="x"),),
        scores=Scores(views={"R-CC": 0.5}, breasts={"R": 0.5}, exam=0.5, operating_point=0.4,
                      suspicious=True),
        missing_views=(), outputs=(OutputFile(kind="seg", file="outputs/s.dcm", sop_uid="2.25.3",
                                              series_uid="2.25.4"),),
        sends=(SendResult(destination="pacs", file="s.dcm", sop_uid="2.25.3", status="0x0000",
                          ok=True),))
    write_run_info(tmp_path, info)
    write_record(tmp_path, record)
    assert read_run_info(tmp_path) == info
    assert read_record(tmp_path) == record
    on_disk = json.loads((tmp_path / RECORD_NAME).read_text())
    assert "error" not in on_disk and "not_scored" not in on_disk  # absent, not null
    assert "association_id" not in on_disk["inputs"][0]


def test_manifest_round_trip_keeps_the_last_line_of_a_repeated_instance(tmp_path: Path) -> None:
    retake = InstanceEntry(**{**ENTRY.__dict__, "size_bytes": 99})
    append_manifest(tmp_path, [ENTRY])
    append_manifest(tmp_path, [retake])
    assert read_manifest(tmp_path) == (retake,)
    assert read_manifest(tmp_path / "absent") == ()


def test_send_journal_keeps_each_stored_object_and_skips_a_torn_line(tmp_path: Path) -> None:
    assert read_sent(tmp_path) == {}
    append_sent(tmp_path, "pacs", "1.2.3", "0x0000")
    append_sent(tmp_path, "research", "1.2.3", "0xB000")
    with open(tmp_path / SENT_NAME, "a", encoding="utf-8") as journal:
        journal.write('{"destination": "pacs", "sop_ui')  # a crash mid-line
    assert read_sent(tmp_path) == {("pacs", "1.2.3"): "0x0000", ("research", "1.2.3"): "0xB000"}
    append_sent(tmp_path, "pacs", "1.2.4", None)  # after the torn line: still read
    assert read_sent(tmp_path)[("pacs", "1.2.4")] is None
    clear_sent(tmp_path)
    assert read_sent(tmp_path) == {}
    clear_sent(tmp_path)  # nothing to clear: no error


def test_records_are_immutable_and_refuse_unknown_keys(tmp_path: Path) -> None:
    info = RunInfo.model_validate(OLD_RUN_JSON)
    with pytest.raises(ValidationError):
        info.attempts = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        RunInfo.model_validate({**OLD_RUN_JSON, "surprise": 1})
    with pytest.raises(AttributeError):
        ENTRY.view = "MLO"  # type: ignore[misc]
    assert info.model_copy(update={"attempts": 2}).attempts == 2 and info.attempts == 1
    _write_json(tmp_path / RUN_NAME, {**OLD_RUN_JSON, "surprise": 1})
    assert read_run_info(tmp_path) is None  # not a file we wrote: as if absent
    (tmp_path / RECORD_NAME).write_text("{torn")
    assert read_record(tmp_path) is None


def test_error_kinds_are_types_and_keep_their_text(tmp_path: Path) -> None:
    failure = attempts_exhausted(3)
    assert failure.kind is FailureKind.INPUT
    assert str(failure) == "input: gave up after 3 attempts that did not finish"
    record = RunRecord(run_id="r", study_uid="1.2", state="failed",
                       error=RunFailure(kind=FailureKind.INTERNAL, message="KeyError: 'x: y'"))
    write_record(tmp_path, record)
    on_disk = json.loads((tmp_path / RECORD_NAME).read_text())
    assert on_disk["error"] == "internal: KeyError: 'x: y'" and on_disk["error_kind"] == "internal"
    loaded = read_record(tmp_path)
    assert loaded is not None and loaded.error == record.error
    # The kind on disk wins over whatever the message happens to start with.
    tricky = RunRecord(run_id="r", study_uid="1.2", state="failed",
                       error=RunFailure(kind=FailureKind.SEND, message="input: a PACS named input"))
    write_record(tmp_path, tricky)
    assert read_record(tmp_path) == tricky

"""IT commands on the spool: `mammo-node runs list | retry | discard | purge`, each audited."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.audit import read_audit
from node.cli import main
from node.runs import (
    RECORD_NAME,
    FailureKind,
    InstanceEntry,
    RunFailure,
    RunRecord,
    read_run_info,
    write_record,
    write_run_info,
)
from node.spool import Spool, hash_key
from tests.support.logging_state import logging_restored
from tests.support.settings import write_config


@pytest.fixture(autouse=True)
def _keep_logging_as_it_was() -> Iterator[None]:
    """`main()` configures logging for the process; put it back for the tests that follow."""
    with logging_restored():
        yield


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "node.yaml", spool={"retention_days": 7})


def _spool(config: Path) -> Spool:
    return Spool(config.parent / "spool").ensure()


def _run(spool: Spool, study_uid: str, state: str = "queued", attempts: int = 0) -> str:
    sop_uid = study_uid + ".1"
    tmp = spool.tmp_dir / "x.part"
    tmp.write_bytes(b"DICM")
    spool.add_instance(tmp, InstanceEntry(
        sop_uid, "1.2.840.10008.5.1.4.1.1.1.2", study_uid + ".9", study_uid,
        "1.2.840.10008.1.2.1", "R", "CC", hash_key(sop_uid) + ".dcm", 4, time.time(), "a"))
    run_id = spool.claim_study(hash_key(study_uid), "quiet_period")
    if state == "queued":
        return run_id
    with spool.hold_run(run_id) as held:
        assert held is not None
        info = read_run_info(held)
        assert info is not None
        write_run_info(held, info.model_copy(update={"attempts": attempts}))
        write_record(held, RunRecord(run_id=run_id, study_uid=study_uid, state=state,  # type: ignore[arg-type]
                                     error=RunFailure(kind=FailureKind.SEND, message="pacs: down")))
        spool.finish_run(run_id, state)  # type: ignore[arg-type]
    return run_id


def _listed(config: Path, capsys: pytest.CaptureFixture[str], *states: str) -> list[dict]:
    args = ["runs", "list", "--config", str(config)]
    for state in states:
        args += ["--state", state]
    assert main(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _audit(config: Path) -> list[dict]:
    return read_audit(config.parent / "spool" / "audit.jsonl")


def test_list_filters_by_one_or_more_states(config: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    spool = _spool(config)
    queued = _run(spool, "1.2.3.1")
    failed = _run(spool, "1.2.3.2", "failed", attempts=1)
    done = _run(spool, "1.2.3.3", "done", attempts=1)
    assert {r["run_id"] for r in _listed(config, capsys)} == {queued, failed, done}
    [only_failed] = _listed(config, capsys, "failed")
    assert only_failed["run_id"] == failed and only_failed["error"] == "send: pacs: down"
    assert only_failed["attempts"] == 1 and only_failed["study_uid"] == "1.2.3.2"
    both = _listed(config, capsys, "queued", "failed")
    assert [r["state"] for r in both] == ["queued", "failed"]
    assert both[0]["published"] is False


def test_retry_puts_a_failed_run_back_with_attempts_reset_and_audits_it(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(config)
    run_id = _run(spool, "1.2.3.4", "failed", attempts=3)
    assert main(["runs", "retry", run_id, "--config", str(config)]) == 0
    assert spool.locate(run_id)[0] == "queued"  # type: ignore[index]
    info = spool.run_info(run_id)
    assert info is not None and info.attempts == 0
    assert spool.unpublished_runs() == [run_id]  # the node will publish it
    [event] = [e for e in _audit(config) if e["event"] == "run_retried"]
    assert event["run_id"] == run_id and event["study_uid"] == "1.2.3.4"
    assert event["source"] == "cli" and event["from_state"] == "failed"
    capsys.readouterr()
    assert main(["runs", "retry", run_id, "--config", str(config)]) == 1  # queued: nothing to do
    assert "not failed" in capsys.readouterr().err
    assert main(["runs", "retry", "no-such-run", "--config", str(config)]) == 1
    assert main(["runs", "retry", "../../etc", "--config", str(config)]) == 1


def test_discard_moves_queued_or_failed_runs_and_refuses_one_being_worked_on(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(config)
    queued = _run(spool, "1.2.3.5")
    failed = _run(spool, "1.2.3.6", "failed", attempts=1)
    busy = _run(spool, "1.2.3.7")
    assert main(["runs", "discard", queued, "--reason", "test study", "--config", str(config)]) == 0
    assert main(["runs", "discard", failed, "--config", str(config)]) == 0
    assert spool.runs("discarded") == sorted([queued, failed])
    with spool.hold_run(busy) as held:
        assert held is not None
        capsys.readouterr()
        assert main(["runs", "discard", busy, "--config", str(config)]) == 1
        assert "being worked on" in capsys.readouterr().err
        assert spool.locate(busy)[0] == "work"  # type: ignore[index]
    with spool.hold_run(queued) as held:  # a late message for a discarded run does nothing
        assert held is None
    events = [e for e in _audit(config) if e["event"] == "run_discarded"]
    assert [(e["run_id"], e["from_state"]) for e in events] == [(queued, "queued"),
                                                                (failed, "failed")]
    assert events[0]["reason"] == "test study"
    # A discarded run can be brought back.
    assert main(["runs", "retry", queued, "--config", str(config)]) == 0
    assert spool.locate(queued)[0] == "queued"  # type: ignore[index]


def test_purge_uses_retention_days_by_default_and_never_touches_queued(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(config)
    queued = _run(spool, "1.2.3.8")
    recent = _run(spool, "1.2.3.9", "done", attempts=1)
    old = _run(spool, "1.2.3.10", "failed", attempts=1)
    ten_days_ago = time.time() - 10 * 86400
    os.utime(spool.state_dir("failed") / old / RECORD_NAME, (ten_days_ago, ten_days_ago))
    assert main(["runs", "purge", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["run_id"] for line in out.splitlines()] == [old]
    assert "1 finished run(s) older than 7 days purged" in err
    assert spool.locate(old) is None and spool.locate(recent) is not None
    assert main(["runs", "purge", "--older-than", "0", "--config", str(config)]) == 0
    assert spool.locate(recent) is None
    assert spool.locate(queued)[0] == "queued"  # type: ignore[index]
    purged = [e["run_id"] for e in _audit(config) if e["event"] == "run_purged"]
    assert purged == [old, recent]
    assert main(["runs", "purge", "--older-than", "-1", "--config", str(config)]) == 2

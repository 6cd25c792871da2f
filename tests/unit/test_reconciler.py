"""The reconciler and the late-instance policy: the spool as a durable outbox.

Abandoned runs (work/ with a free lock) go back to queued/ with their attempts kept, poison runs
to failed/; a queued run whose message vanished from Redis is published again, one whose message
is merely waiting is not; a study that gets more instances after its claim is rescored on the
union and supersedes the earlier run; retention purges finished runs only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from kombu import Connection

from node.audit import read_audit
from node.completion import AssociationTracker
from node.errors import TransientError
from node.queueing import build_publisher, publish_run, waiting_run_ids
from node.runs import (
    PREVIOUS_RECORD_NAME,
    PUBLISHED_NAME,
    RECORD_NAME,
    RUN_NAME,
    FailureKind,
    InstanceEntry,
    RunFailure,
    RunRecord,
    read_manifest,
    read_record,
    read_run_info,
    write_record,
    write_run_info,
)
from node.service import CompletionWatcher, Reconciler, purge_expired
from node.settings import Settings
from node.spool import RunStateError, Spool, hash_key
from pipelines.results import ModelIdentity
from pipelines.scoring import process_run
from tests.support.settings import make_settings
from tools.stack.services import RedisService, free_port

STUDY_UID = "1.2.826.0.1.3680043.10.1.77"


def _reconciler_settings(tmp_path: Path, broker_port: int | None = None,
                         **reconcile: float) -> Settings:
    """Two attempts per run, short reconcile periods, a broker on `broker_port` (none by default)."""
    return make_settings(
        tmp_path,
        broker={"url": f"redis://127.0.0.1:{broker_port or free_port()}/0", "publish_timeout_s": 1},
        scoring={"max_attempts": 2},
        reconcile={"interval_s": 1, "republish_after_s": 30, "abandoned_after_s": 5, **reconcile},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )


def _receive(spool: Spool, view_key: str, study_uid: str = STUDY_UID) -> str:
    sop_uid = f"{study_uid}.{sum(map(ord, view_key))}"
    tmp = spool.tmp_dir / f"{hash_key(sop_uid)}.part"
    tmp.write_bytes(b"DICM" + view_key.encode())
    spool.add_instance(tmp, InstanceEntry(
        sop_uid, "1.2.840.10008.5.1.4.1.1.1.2", study_uid + ".9", study_uid,
        "1.2.840.10008.1.2.1", view_key[0], view_key[2:], hash_key(sop_uid) + ".dcm", 5,
        time.time(), "assoc"))
    return sop_uid


def _queued_run(spool: Spool, *views: str) -> str:
    for view in views or ("R-CC",):
        _receive(spool, view)
    return spool.claim_study(hash_key(STUDY_UID), "quiet_period")


def _set_attempts(run_dir: Path, attempts: int) -> None:
    info = read_run_info(run_dir)
    assert info is not None
    write_run_info(run_dir, info.model_copy(update={"attempts": attempts}))


def _finish_held(spool: Spool, run_id: str, state: str, failure: RunFailure | None = None) -> None:
    """Write a minimal record for a run this test holds and move it to done/ or failed/."""
    finished = "done" if state == "done" else "failed"
    write_record(spool.state_dir("work") / run_id,
                 RunRecord(run_id=run_id, study_uid=STUDY_UID, state=finished, error=failure))
    spool.finish_run(run_id, finished)


def _hold_and_die(root: str, run_id: str) -> None:
    with Spool(Path(root)).hold_run(run_id):
        os._exit(9)  # a worker killed mid-run: its flock dies with it


def _abandon(spool: Spool, run_id: str, attempts: int) -> None:
    _set_attempts(spool.state_dir("queued") / run_id, attempts)
    child = multiprocessing.get_context("fork").Process(target=_hold_and_die,
                                                       args=(str(spool.root), run_id))
    child.start()
    child.join(10)
    assert spool.locate(run_id)[0] == "work"  # type: ignore[index]


def _reconciler(settings: Settings, clock: list[float]) -> Reconciler:
    spool = Spool(settings.spool.dir).ensure()
    return Reconciler(settings, spool, clock=lambda: clock[0])


def test_abandoned_run_goes_back_to_queued_with_its_attempts(tmp_path: Path) -> None:
    settings = _reconciler_settings(tmp_path)
    clock = [1000.0]
    reconciler = _reconciler(settings, clock)
    run_id = _queued_run(reconciler.spool)
    reconciler.spool.mark_published(run_id)
    _abandon(reconciler.spool, run_id, attempts=1)
    assert reconciler.tick()["requeued"] == []  # free once: maybe a worker between rename and lock
    clock[0] += 5
    assert reconciler.tick()["requeued"] == [run_id]
    assert reconciler.spool.locate(run_id)[0] == "queued"  # type: ignore[index]
    assert reconciler.spool.unpublished_runs() == [run_id]  # the watcher publishes it again
    info = reconciler.spool.run_info(run_id)
    assert info is not None and info.attempts == 1
    [event] = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "run_requeued"]
    assert event["run_id"] == run_id and event["reason"] == "abandoned_by_dead_worker"


def test_run_held_by_a_live_worker_is_left_alone(tmp_path: Path) -> None:
    settings = _reconciler_settings(tmp_path)
    clock = [1000.0]
    reconciler = _reconciler(settings, clock)
    run_id = _queued_run(reconciler.spool)
    with reconciler.spool.hold_run(run_id) as held:
        assert held is not None
        for _ in range(3):
            clock[0] += 60
            assert reconciler.tick() == {"requeued": [], "failed": [], "republish": []}
        assert reconciler.spool.locate(run_id)[0] == "work"  # type: ignore[index]


def test_run_that_keeps_killing_workers_is_parked_in_failed_and_stays_there(tmp_path: Path
                                                                            ) -> None:
    settings = _reconciler_settings(tmp_path)
    clock = [1000.0]
    reconciler = _reconciler(settings, clock)
    run_id = _queued_run(reconciler.spool)
    _abandon(reconciler.spool, run_id, attempts=settings.scoring.max_attempts)
    reconciler.tick()
    clock[0] += 5
    assert reconciler.tick()["failed"] == [run_id]
    state, path = reconciler.spool.locate(run_id)  # type: ignore[misc]
    assert state == "failed"
    record = json.loads((path / RECORD_NAME).read_text())
    assert record["error"] == "input: gave up after 2 attempts that did not finish"
    typed = read_record(path)
    assert typed is not None and typed.error == RunFailure(
        kind=FailureKind.INPUT, message="gave up after 2 attempts that did not finish")
    clock[0] += 600
    assert reconciler.tick() == {"requeued": [], "failed": [], "republish": []}
    with reconciler.spool.hold_run(run_id) as held:  # a late message for it: no-op
        assert held is None
    [event] = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "study_failed"]
    assert event["run_id"] == run_id and event["study_uid"] == STUDY_UID


def test_run_moved_back_while_a_worker_reaches_for_it_is_not_taken_twice(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    run_id = _queued_run(spool)
    _abandon(spool, run_id, attempts=1)
    with spool.lock_if_free(run_id) as path:  # the reconciler holds it...
        assert path is not None
        with spool.hold_run(run_id) as held:  # ...so a redelivered message does nothing
            assert held is None
    assert spool.requeue_abandoned(run_id)
    with spool.hold_run(run_id) as held:  # from queued/ again: taken normally
        assert held == spool.state_dir("work") / run_id


def test_broker_down_leaves_published_runs_alone(tmp_path: Path) -> None:
    settings = _reconciler_settings(tmp_path, republish_after_s=1)
    clock = [time.time() + 100]
    reconciler = _reconciler(settings, clock)
    run_id = _queued_run(reconciler.spool)
    reconciler.spool.mark_published(run_id)
    with pytest.raises(TransientError):
        waiting_run_ids(settings)
    assert reconciler.tick()["republish"] == []
    assert reconciler.spool.unpublished_runs() == []


@pytest.mark.integration
@pytest.mark.requires_bin("redis-server")
def test_lost_message_is_published_again_but_a_waiting_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisService(tmp_path / "redis") as redis_service:
        monkeypatch.setenv("MAMMO_BROKER_PASSWORD", redis_service.password)
        settings = _reconciler_settings(tmp_path, broker_port=redis_service.port, republish_after_s=30)
        clock = [time.time()]
        spool = Spool(settings.spool.dir).ensure()
        watcher = CompletionWatcher(settings, spool, AssociationTracker(),
                                    build_publisher(settings), clock=lambda: clock[0])
        reconciler = Reconciler(settings, spool, clock=lambda: clock[0])
        waiting = _queued_run(spool)
        other_study = "1.2.826.0.1.3680043.10.1.78"
        _receive(spool, "L-CC", study_uid=other_study)
        lost = spool.claim_study(hash_key(other_study), "quiet_period")
        assert sorted(watcher.tick()) == sorted([waiting, lost])
        assert waiting_run_ids(settings) == {waiting, lost}
        redis_service.restart()  # no persistence: both messages are gone...
        watcher.tick()
        publish_run(build_publisher(settings), settings, waiting)  # ...and one comes back (long queue)
        clock[0] += 10
        assert reconciler.tick()["republish"] == []  # too early to call anything lost
        clock[0] += 30
        assert reconciler.tick()["republish"] == [lost]
        requeued = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "run_requeued"]
        assert [(e["run_id"], e["reason"]) for e in requeued] == [(lost, "message_lost")]
        assert watcher.tick() == [lost]
        assert waiting_run_ids(settings) == {waiting, lost}
        clock[0] += 60
        assert reconciler.tick()["republish"] == []  # both waiting: no flood

        # A worker reserves a message (kombu moves it to its `unacked` hash) before its pool
        # process runs it: just reserved, it still counts; reserved long ago, it does not.
        with Connection(settings.broker.url_with_password()) as connection:
            reserved = connection.SimpleQueue(settings.broker.queue).get(timeout=5)
            run_id = reserved.payload[0][0]
            assert run_id in waiting_run_ids(settings, reserved_within_s=30)
            assert run_id not in waiting_run_ids(settings, reserved_within_s=30,
                                                 now=time.time() + 60)
            assert run_id not in waiting_run_ids(settings)


def test_late_instance_starts_a_run_on_the_union_that_supersedes_the_first(tmp_path: Path
                                                                           ) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    first = _queued_run(spool, "R-CC", "L-CC", "R-MLO")
    with spool.hold_run(first):
        _finish_held(spool, first, "done")
    late_sop = _receive(spool, "L-MLO")
    second = spool.claim_study(hash_key(STUDY_UID), "quiet_period")
    second_dir = spool.state_dir("queued") / second
    assert len(read_manifest(second_dir)) == 4
    assert late_sop in {e.sop_uid for e in read_manifest(second_dir)}
    for entry in read_manifest(second_dir):
        assert (second_dir / entry.file).read_bytes().startswith(b"DICM")
    info = json.loads((second_dir / RUN_NAME).read_text())
    assert info["supersedes"] == [first] and info["instance_count"] == 4
    record = json.loads((spool.state_dir("done") / first / RECORD_NAME).read_text())
    assert record["superseded_by"] == second
    assert spool.superseded_by(first) == second
    # The first run's purge must not take the second run's instances with it.
    purged = spool.purge_finished(0, now=time.time() + 1)
    assert [p["run_id"] for p in purged] == [first]
    assert all((second_dir / e.file).exists() for e in read_manifest(second_dir))


class _MustNotScore:
    identity = ModelIdentity("never", "0", 0.5)
    last_timings_s: dict[str, float] = {}

    def predict(self, images: list[object]) -> list[object]:
        raise AssertionError("a superseded run must not be scored")


def test_superseded_run_that_was_still_queued_is_not_scored(tmp_path: Path) -> None:
    settings = _reconciler_settings(tmp_path)
    spool = Spool(settings.spool.dir).ensure()
    first = _queued_run(spool, "R-CC")
    _receive(spool, "L-CC")
    second = spool.claim_study(hash_key(STUDY_UID), "deadline")
    assert spool.superseded_by(first) == second
    assert spool.superseded_by(second) is None
    assert process_run(settings, spool, first, _MustNotScore()) == "done"
    record = json.loads((spool.state_dir("done") / first / RECORD_NAME).read_text())
    assert record["superseded_by"] == second and record["outputs"] == []
    with pytest.raises(RunStateError, match=f"superseded by {second}"):
        spool.requeue_run(first)


def test_the_same_study_sent_twice_is_one_run_superseding_the_other(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    first = _queued_run(spool, "R-CC", "L-CC")
    _receive(spool, "R-CC")
    _receive(spool, "L-CC")
    second = spool.claim_study(hash_key(STUDY_UID), "quiet_period")
    assert len(read_manifest(spool.state_dir("queued") / second)) == 2  # no instance twice
    assert spool.superseded_by(first) == second


def _finished(spool: Spool, state: str) -> str:
    study_uid = f"1.2.826.0.1.3680043.10.2.{state.__hash__() % 1000}"
    _receive(spool, "R-CC", study_uid=study_uid)
    run_id = spool.claim_study(hash_key(study_uid), "quiet_period")
    if state == "queued":
        return run_id
    with spool.hold_run(run_id):
        if state == "work":
            return run_id
        _finish_held(spool, run_id, state)
    return run_id


def test_retention_purges_finished_runs_only_and_audits_them(tmp_path: Path) -> None:
    settings = _reconciler_settings(tmp_path)
    spool = Spool(settings.spool.dir).ensure()
    runs = {state: _finished(spool, state) for state in ("queued", "done", "failed")}
    spool.discard_run(_finished(spool, "queued"), reason="test")
    audit = Reconciler(settings, spool).audit
    assert purge_expired(settings, spool, audit) == []  # younger than retention_days
    old = time.time() + settings.spool.retention_days * 86400 + 60
    purged = purge_expired(settings, spool, audit, now=old)
    assert sorted(p["state"] for p in purged) == ["discarded", "done", "failed"]
    assert spool.runs("queued") == [runs["queued"]]
    assert spool.runs("done") == spool.runs("failed") == spool.runs("discarded") == []
    events = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "run_purged"]
    assert sorted(e["run_id"] for e in events) == sorted(p["run_id"] for p in purged)
    assert list(spool.tmp_dir.iterdir()) == []


def test_work_runs_are_never_purged_and_held_ones_never_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    run_id = _queued_run(spool)
    with spool.hold_run(run_id):
        assert spool.purge_finished(0, now=time.time() + 10**9) == []
        with pytest.raises(RunStateError, match="being worked on"):
            spool.discard_run(run_id)
        assert spool.locate(run_id)[0] == "work"  # type: ignore[index]


def test_retry_resets_attempts_and_unpublishes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    run_id = _queued_run(spool)
    spool.mark_published(run_id)
    with spool.hold_run(run_id) as held:
        assert held is not None
        _set_attempts(held, 3)
        _finish_held(spool, run_id, "failed", RunFailure(kind=FailureKind.SEND, message="x"))
    spool.requeue_run(run_id)
    path = spool.state_dir("queued") / run_id
    assert json.loads((path / RUN_NAME).read_text())["attempts"] == 0
    assert not (path / PUBLISHED_NAME).exists() and not (path / RECORD_NAME).exists()
    assert json.loads((path / PREVIOUS_RECORD_NAME).read_text())["error"] == "send: x"


def test_supersede_notes_lost_in_a_crash_are_written_by_the_reconciler(tmp_path: Path) -> None:
    settings = _reconciler_settings(tmp_path)
    clock = [1000.0]
    reconciler = _reconciler(settings, clock)
    spool = reconciler.spool
    first = _queued_run(spool, "R-CC")
    with spool.hold_run(first):
        _finish_held(spool, first, "done")
    _receive(spool, "L-CC")
    second = spool.claim_study(hash_key(STUDY_UID), "quiet_period")
    # As if `serve` died right after the claim, before the notes in the earlier run:
    first_dir = spool.state_dir("done") / first
    (first_dir / "superseded.json").unlink()
    write_record(first_dir, RunRecord(run_id=first, study_uid=STUDY_UID, state="done"))
    assert spool.superseded_by(first) is None
    reconciler.tick()
    assert spool.superseded_by(first) == second
    assert json.loads((first_dir / RECORD_NAME).read_text())["superseded_by"] == second


@pytest.mark.integration
@pytest.mark.requires_bin("redis-server")
def test_with_redis_claims_a_run_is_requeued_only_once_its_lease_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on another host holds the lease but no flock the node can see: the run stays in
    work/ while the lease lives, and goes back to queued/ once it expired; Redis out of reach
    recovers nothing."""
    with RedisService(tmp_path / "redis") as redis_service:
        monkeypatch.setenv("MAMMO_BROKER_PASSWORD", redis_service.password)
        settings = make_settings(
            tmp_path,
            broker={"url": f"redis://127.0.0.1:{redis_service.port}/0", "publish_timeout_s": 1},
            scoring={"max_attempts": 2}, claims={"mode": "redis", "lease_seconds": 30},
            reconcile={"interval_s": 1, "republish_after_s": 30, "abandoned_after_s": 5},
            audit={"path": str(tmp_path / "audit.jsonl")},
        )
        clock = [1000.0]
        reconciler = _reconciler(settings, clock)
        assert reconciler.leases is not None
        run_id = _queued_run(reconciler.spool)
        _abandon(reconciler.spool, run_id, attempts=1)  # in work/, flock free
        remote = reconciler.leases.acquire(run_id)  # the remote worker's live lease
        assert remote is not None
        for _ in range(3):
            clock[0] += 60
            assert reconciler.tick()["requeued"] == []
        assert reconciler.spool.locate(run_id)[0] == "work"  # type: ignore[index]
        redis_service.stop()
        clock[0] += 60
        assert reconciler.tick()["requeued"] == []  # cannot tell: wait
        redis_service.start()  # empty: the lease is gone, as after its time ran out
        assert reconciler.tick()["requeued"] == []  # free once
        clock[0] += 5
        assert reconciler.tick()["requeued"] == [run_id]
        assert reconciler.spool.locate(run_id)[0] == "queued"  # type: ignore[index]
        assert not reconciler.leases.held(run_id)  # the reconciler's own lease, released
        assert not remote.renew()  # the remote worker's fence now refuses it

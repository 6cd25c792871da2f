"""A worker dies mid-inference: the study is still scored, and its results land exactly once.

- A pool child SIGKILLed (what the OOM killer does to the process holding the model): Celery
  (acks_late + reject_on_worker_lost) gives the message back, a new child takes over the run
  from work/ (its lock died with the killed child), or the reconciler puts it back first.
- The whole worker SIGKILLed, then a new one started: the message stays unacknowledged in
  Redis until the visibility timeout (half an hour by default), but the reconciler sees the
  free lock and re-queues the run within `reconcile.abandoned_after_s` + one pass.
- The whole worker SIGKILLed after the PACS stored the results and before the run's record:
  the next worker scores the study again and sends the PACS nothing (the run's send journal).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.scoring import TEST_PAUSE_AFTER_SEND_ENV as AFTER_SEND_ENV
from tests.support.fault_stack import (
    PAUSE_ENV,
    PAUSE_S,
    assert_delivered_exactly_once,
    log_events,
    new_study,
    pacs_objects,
    send,
    wait_for_log,
)
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]


def _send_and_wait_for_inference(stack: NodeStack, tmp_path: Path, seed: int) -> tuple[str, str]:
    paths, study_uid = new_study(tmp_path / "study", seed=seed)
    pauses = len(log_events(stack, "worker", "test_pause_before_inference"))
    send(stack, paths)
    line = wait_for_log(stack, "worker", "test_pause_before_inference", after=pauses)
    [run_id] = [r for r in stack.run_ids("work") if r in line]
    return study_uid, run_id


@pytest.mark.timeout(240)
def test_worker_child_killed_mid_inference(stack: NodeStack, tmp_path: Path) -> None:
    study_uid, run_id = _send_and_wait_for_inference(stack, tmp_path, seed=201)
    killed = stack.kill_worker_child()
    started = time.monotonic()
    record = assert_delivered_exactly_once(stack, study_uid, views=4)
    recovery_s = time.monotonic() - started
    assert record["run_id"] == run_id
    assert record["attempts"] == 2  # the killed attempt counted
    assert killed not in stack.worker_children()
    print(f"worker child SIGKILL mid-inference: delivered {recovery_s:.1f} s after the kill "
          f"(includes a {PAUSE_S:g} s test pause)")


@pytest.mark.timeout(300)
def test_whole_worker_killed_then_a_new_worker_started(stack: NodeStack, tmp_path: Path
                                                       ) -> None:
    study_uid, run_id = _send_and_wait_for_inference(stack, tmp_path, seed=202)
    requeued_before = len(log_events(stack, "node", "run_abandoned_requeued"))
    stack.kill_worker()  # main process and pool at once: nobody tells Redis anything
    started = time.monotonic()
    wait_for_log(stack, "node", "run_abandoned_requeued", contains=run_id, after=requeued_before,
                 timeout_s=30)
    requeued_s = time.monotonic() - started
    stack.start_new_worker(extra_env={PAUSE_ENV: str(PAUSE_S)})
    record = assert_delivered_exactly_once(stack, study_uid, views=4)
    recovery_s = time.monotonic() - started
    assert record["run_id"] == run_id
    assert record["attempts"] == 2
    print(f"whole worker SIGKILL: run back in queued/ after {requeued_s:.1f} s, delivered "
          f"{recovery_s:.1f} s after the kill (includes starting a worker and a "
          f"{PAUSE_S:g} s test pause)")


@pytest.mark.timeout(300)
def test_whole_worker_killed_after_the_pacs_stored_the_results(stack: NodeStack,
                                                                tmp_path: Path) -> None:
    """Some PACS answer a second copy of an instance with a failure: the attempt after a worker
    killed between the PACS's answers and the run's record must not send them again."""
    paths, study_uid = new_study(tmp_path / "study", seed=203)
    stack.kill_worker()
    stack.start_new_worker(extra_env={PAUSE_ENV: str(PAUSE_S), AFTER_SEND_ENV: "120"})
    try:
        paused = len(log_events(stack, "worker", "test_pause_after_send"))
        requeued_before = len(log_events(stack, "node", "run_abandoned_requeued"))
        send(stack, paths)
        line = wait_for_log(stack, "worker", "test_pause_after_send", after=paused)
        [run_id] = [r for r in stack.run_ids("work") if r in line]
        stored = pacs_objects(stack, study_uid)
        assert len(stored["sr"]) == 1 and len(stored["seg"]) == 4  # the PACS has them
    finally:
        stack.kill_worker()  # no record written: the run is abandoned in work/
        stack.start_new_worker(extra_env={PAUSE_ENV: str(PAUSE_S)})
    wait_for_log(stack, "node", "run_abandoned_requeued", contains=run_id, after=requeued_before,
                 timeout_s=30)
    record = assert_delivered_exactly_once(stack, study_uid, views=4)
    assert record["run_id"] == run_id and record["attempts"] == 2
    assert pacs_objects(stack, study_uid) == stored
    # every object the PACS had was skipped, with the status it had answered
    assert {(s["destination"], s["status"], s.get("earlier")) for s in record["sends"]} == {
        ("pacs", "0x0000", True)}
    assert len(record["sends"]) == len(record["outputs"])

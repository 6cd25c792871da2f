"""Redis away or emptied: the spool is the outbox, so the run is published again and scored once.

- Redis down when a study arrives: the listener keeps accepting, the run waits in queued/
  without published.json, and the watcher publishes it (publish backoff, at most 60 s) once
  Redis is back.
- Redis restarted without persistence while the message waited in it: the message is gone,
  the run says published; the reconciler sees the run's message missing from the queue after
  `reconcile.republish_after_s` and publishes it again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.fault_stack import (
    PAUSE_ENV,
    PAUSE_S,
    assert_delivered_exactly_once,
    log_events,
    new_study,
    runs_of,
    send,
    wait_for_log,
)
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]


def _wait_for_queued_run(stack: NodeStack, study_uid: str, published: bool,
                         timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in runs_of(stack, study_uid).get("queued", []):
            run_id = run["run_id"]
            if (stack.spool_dir / "queued" / run_id / "published.json").exists() == published:
                return run_id
        time.sleep(0.1)
    raise TimeoutError(f"no queued run (published={published}): {runs_of(stack, study_uid)}")


@pytest.mark.timeout(240)
def test_redis_down_when_a_study_arrives(stack: NodeStack, tmp_path: Path) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=211)
    failures_before = len(log_events(stack, "node", "run_publish_failed"))
    stack.redis.kill()
    try:
        send(stack, paths)  # the listener does not need Redis
        run_id = _wait_for_queued_run(stack, study_uid, published=False)
        wait_for_log(stack, "node", "run_publish_failed", contains=run_id, after=failures_before)
        assert stack.echo() == 0
    finally:
        stack.redis.start()
    started = time.monotonic()
    record = assert_delivered_exactly_once(stack, study_uid, views=4, timeout_s=180)
    recovery_s = time.monotonic() - started
    assert record["run_id"] == run_id and record["attempts"] == 1
    print(f"Redis down when the study arrived: delivered {recovery_s:.1f} s after Redis came "
          f"back (includes a {PAUSE_S:g} s test pause)")


@pytest.mark.timeout(300)
def test_redis_restarted_empty_loses_the_message_and_the_run_is_published_again(
    stack: NodeStack, tmp_path: Path
) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=212)
    lost_before = len(log_events(stack, "node", "run_message_lost"))
    stack.stop_worker()  # nobody consumes: the message waits in Redis
    send(stack, paths)
    run_id = _wait_for_queued_run(stack, study_uid, published=True)
    stack.redis.kill()  # no AOF, no RDB: the queue is gone
    stack.redis.start()
    started = time.monotonic()
    wait_for_log(stack, "node", "run_message_lost", contains=run_id, after=lost_before,
                 timeout_s=60)
    republished_s = time.monotonic() - started
    stack.start_new_worker(extra_env={PAUSE_ENV: str(PAUSE_S)})
    record = assert_delivered_exactly_once(stack, study_uid, views=4, timeout_s=180)
    recovery_s = time.monotonic() - started
    assert record["run_id"] == run_id and record["attempts"] == 1
    print(f"Redis restarted empty: message republished {republished_s:.1f} s after the restart, "
          f"delivered {recovery_s:.1f} s after it (includes starting a worker and a "
          f"{PAUSE_S:g} s test pause)")

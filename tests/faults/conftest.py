"""Fault tests: the whole node on real parts (Redis, Orthanc, `mammo-node serve`, a Celery worker)
broken on purpose, then asked whether every study came back exactly once.

One stack serves every fault module that asks for the `stack` fixture (starting it costs ~10 s
of model loading) and is stopped after the package's last test; each test leaves it whole
again, and `stack` repairs whatever a failed test left dead. Timings are tightened so that
recovery takes seconds, not the production minutes: reconcile every 1 s, a lost message
republished after 5 s, an abandoned run after 2 s. Tests print the recovery times they
measure (`pytest -rP`); they never assert them. What the tests ask of the stack (send a study,
wait for it, check it was delivered exactly once) is in tests/support/fault_stack.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fault_stack import PAUSE_ENV, PAUSE_S
from tools.stack.node_stack import NodeStack

# Long enough that a node killed after part of a study is back before the study counts as
# complete; four-view studies complete at once anyway (views_complete).
QUIET_PERIOD_S = 8.0
FAULT_CONFIG: dict[str, Any] = {
    "reconcile": {"interval_s": 1, "republish_after_s": 5, "abandoned_after_s": 2},
    "scoring": {"max_attempts": 3},
}
SEND_ATTEMPTS = 6  # with backoff 0.5, 1, 2, 4, 5 s: a PACS outage of ~12 s is ridden out in-task


@pytest.fixture(scope="package")  # stopped after the last test of tests/faults
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    node_stack = NodeStack(tmp_path_factory.mktemp("faults"), quiet_period_s=QUIET_PERIOD_S,
                           send_attempts=SEND_ATTEMPTS, config_overrides=FAULT_CONFIG,
                           with_worker=False)
    node_stack.redis.persist = True
    node_stack.orthanc.persist = True
    try:
        node_stack.start()
        node_stack.start_new_worker(extra_env={PAUSE_ENV: str(PAUSE_S)})
        yield node_stack
    finally:
        node_stack.stop()


@pytest.fixture
def stack(fault_stack: NodeStack) -> NodeStack:
    """The shared stack, with anything an earlier test left dead started again."""
    s = fault_stack
    if not s.redis.running:
        s.redis.start()
    if not s.orthanc.running:
        s.orthanc.start()
    if s.node is None or s.node.poll() is not None:
        s.start_node()
    if s.worker is None or s.worker.poll() is not None or not s.worker_children():
        s.kill_worker()
        s.start_new_worker(extra_env={PAUSE_ENV: str(PAUSE_S)})
    return s

"""`mammo-node serve` killed in the middle of a study, restarted, and the rest of the study sent.

What was acknowledged before the kill is on disk with its manifest line; the restarted watcher
picks the study up from incoming/, the rest joins it, and one run scores all four views.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.fault_stack import assert_delivered_exactly_once, new_study, runs_of, send
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]


@pytest.mark.timeout(240)
def test_node_killed_mid_study_then_restarted_and_the_rest_sent(stack: NodeStack, tmp_path: Path
                                                                ) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=221)
    send(stack, paths[:2])
    stack.kill_node()  # SIGKILL: no clean shutdown, the watcher dies mid-pass
    assert stack.echo() != 0
    started = time.monotonic()
    stack.start_node()
    restart_s = time.monotonic() - started
    send(stack, paths[2:])
    record = assert_delivered_exactly_once(stack, study_uid, views=4)
    recovery_s = time.monotonic() - started
    assert record["instance_count"] == 4
    assert record["completion_reason"] == "views_complete"
    runs = runs_of(stack, study_uid)
    assert sum(len(v) for v in runs.values()) == 1  # one run: nothing scored twice
    print(f"node SIGKILL mid-study: answering again {restart_s:.1f} s after the restart began, "
          f"results delivered {recovery_s:.1f} s after it")

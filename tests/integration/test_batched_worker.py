"""The batching worker (`worker.threads`, `worker.batch_views`, pipelines/batching.py) on real
parts: Redis, `serve`, one `mammo-node worker` process running Celery's threads pool with one
shared model, Orthanc as the PACS.

Several studies are queued before the worker starts, so it takes four at once and runs their
views through the model together; every run's scores and result objects are those of the
default worker (one study at a time, prefork) scoring the same studies in a second stack.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]

ROWS, COLS = 256, 208
STUDIES = 6
# A long wait, so the batches close on their size or when the queue runs dry, whatever the load
# of the machine running the test (the wait is a ceiling, not a delay: a full batch goes at once).
BATCHING = {"threads": 4, "batch_views": 16, "batch_wait_ms": 3000}


def _queue_then_score(root: Path, studies: list[tuple[list[Path], str]],
                      worker: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]], str]:
    """Send every study, wait until all are queued in Redis, then start the worker; the run
    records by study UID and the worker's log."""
    stack = NodeStack(root, quiet_period_s=2, with_worker=False,
                      config_overrides={"worker": worker} if worker else None)
    with stack:
        for paths, _ in studies:
            result = stack.storescu(paths)
            assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 120
        while len(stack.run_ids("queued")) < len(studies):
            assert time.monotonic() < deadline, stack.log_tail("node")
            time.sleep(0.2)
        stack.start_worker()
        records = {uid: stack.wait_for_record(uid, timeout_s=300) for _, uid in studies}
        return records, stack.log_tail("worker", 10_000_000)


def _events(log: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        if f'"event": "{name}"' in line:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def test_batched_worker_scores_queued_studies_as_the_default_worker(tmp_path: Path) -> None:
    studies = []
    for index in range(STUDIES):
        paths = make_study(tmp_path / f"study{index}", rows=ROWS, cols=COLS, seed=700 + index)
        studies.append((paths, str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)))

    batched, batched_log = _queue_then_score(tmp_path / "batched", studies, BATCHING)
    default, default_log = _queue_then_score(tmp_path / "default", studies, None)

    # The batching worker is one process on Celery's threads pool with one batcher...
    [started] = _events(batched_log, "model_batcher_started")
    assert (started["threads"], started["batch_views"]) == (4, 16)
    # ...and ran views of several studies in one forward pass.
    batches = _events(batched_log, "model_batch")
    assert sum(b["views"] for b in batches) == 4 * STUDIES
    assert max(b["studies"] for b in batches) > 1
    assert all(b["views"] <= 16 for b in batches)
    assert not _events(default_log, "model_batch")

    for _, uid in studies:
        got, want = batched[uid], default[uid]
        assert got["state"] == want["state"] == "done"
        assert set(got["scores"]["views"]) == set(want["scores"]["views"])
        for view, score in want["scores"]["views"].items():
            assert got["scores"]["views"][view] == pytest.approx(score, abs=1e-5)
        assert got["scores"]["exam"] == pytest.approx(want["scores"]["exam"], abs=1e-5)
        assert got["scores"]["suspicious"] == want["scores"]["suspicious"]
        # The same objects (deterministic UIDs), all stored in the PACS.
        assert [(o["kind"], o["sop_uid"], o["series_uid"]) for o in got["outputs"]] == \
            [(o["kind"], o["sop_uid"], o["series_uid"]) for o in want["outputs"]]
        assert all(s["ok"] for s in got["sends"]) and len(got["sends"]) == len(want["sends"])
        for output in (o for o in want["outputs"] if o["kind"] == "seg"):  # the same regions
            mine = dcmread(tmp_path / "batched" / "spool" / "done" / got["run_id"] / output["file"])
            theirs = dcmread(tmp_path / "default" / "spool" / "done" / want["run_id"]
                             / output["file"])
            assert mine.PixelData == theirs.PixelData
        # Each study carries its share of the batches it was in, and its wait for them.
        assert {"inference", "batch_wait"} <= set(got["timings_s"])
        assert "batch_wait" not in want["timings_s"]

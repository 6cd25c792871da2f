"""What the fault tests ask of the shared stack: send a study, find its runs, wait for them
to settle, and check that it was delivered exactly once with memory still bounded.

The stack itself (one per package, repaired between tests) is the `stack` fixture of
tests/faults/conftest.py; these are plain functions so test modules import them from here
rather than from a conftest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack

PAUSE_ENV = "MAMMO_NODE_TEST_PAUSE_BEFORE_INFERENCE_S"
PAUSE_S = 2.0  # every run sleeps this long before inference: room to kill a worker "mid-inference"
ROWS, COLS = 256, 208


def new_study(folder: Path, seed: int, views: tuple[str, ...] = ("R-CC", "L-CC", "R-MLO", "L-MLO")
              ) -> tuple[list[Path], str]:
    paths = make_study(folder, views=list(views), rows=ROWS, cols=COLS, seed=seed)
    return paths, str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def send(stack: NodeStack, paths: list[Path]) -> None:
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr


def runs_of(stack: NodeStack, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Every run of the study in the spool, by state (run.json merged with record.json)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for state in ("queued", "work", "done", "failed", "discarded"):
        for run_id in stack.run_ids(state):
            folder = stack.spool_dir / state / run_id
            data: dict[str, Any] = {}
            for name in ("run.json", "record.json", "superseded.json"):
                try:
                    data.update(json.loads((folder / name).read_text()))
                except (OSError, ValueError):
                    continue
            if data.get("study_uid") == study_uid:
                found.setdefault(state, []).append(data)
    return found


def wait_settled(stack: NodeStack, study_uid: str, timeout_s: float = 120.0
                 ) -> dict[str, list[dict[str, Any]]]:
    """Until no run of the study is queued or in work and at least one has finished."""
    deadline = time.monotonic() + timeout_s
    runs: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        runs = runs_of(stack, study_uid)
        if not runs.get("queued") and not runs.get("work") and (runs.get("done")
                                                                 or runs.get("failed")):
            return runs
        time.sleep(0.2)
    raise TimeoutError(f"study not settled after {timeout_s} s: {runs}; "
                       f"node: {stack.log_tail('node')} worker: {stack.log_tail('worker')}")


def pacs_objects(stack: NodeStack, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs of our SR and SEG objects stored in Orthanc for the study."""
    ids = stack.result_ids(study_uid)
    return {kind: sorted(str(stack.orthanc.instance_tags(i)["SOPInstanceUID"]) for i in found)
            for kind, found in ids.items()}


def assert_delivered_exactly_once(stack: NodeStack, study_uid: str, views: int,
                                  timeout_s: float = 120.0) -> dict[str, Any]:
    """One done run carries the study; Orthanc holds exactly its SR and SEGs, nothing twice.

    Returns that run's record. Waits for the results, then for the spool to settle (so a
    duplicate still on its way would have landed), then counts again.
    """
    stack.wait_for_results(study_uid, seg_count=views, timeout_s=timeout_s)
    runs = wait_settled(stack, study_uid, timeout_s)
    assert not runs.get("failed"), runs["failed"]
    current = [r for r in runs.get("done", []) if not r.get("superseded_by")]
    assert len(current) == 1, runs
    [record] = current
    time.sleep(1.0)  # one more reconcile pass: nothing new may arrive
    stored = pacs_objects(stack, study_uid)
    ours = {kind: sorted(o["sop_uid"] for o in record["outputs"] if o["kind"] == kind)
            for kind in ("sr", "seg")}
    assert stored == ours, (stored, ours)
    assert len(stored["sr"]) == 1 and len(stored["seg"]) == views
    # Orthanc instance count for the study: the sources we did not send plus our objects only.
    # (The SR, the Mammography CAD SR and one SEG per view.)
    assert len(stack.orthanc.find_instances(study_uid=study_uid)) == 2 + views
    assert all(s["ok"] for s in record["sends"])
    assert stack.echo() == 0, "the node must still answer C-ECHO"
    assert_memory_bounded(stack)
    return record


# Generous ceilings that a leak across the fault tests would cross: the listener idles at
# ~90 MiB, a worker process with the model loaded at ~400 MiB.
NODE_RSS_BOUND = 512 * 2**20
WORKER_RSS_BOUND = 2 * 2**30


def _rss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone since it was listed
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def assert_memory_bounded(stack: NodeStack) -> None:
    """The node and every worker process stay under their ceilings after the fault."""
    assert stack.node is not None
    node_rss = _rss(stack.node.pid)
    workers = [stack.worker.pid] if stack.worker is not None else []
    worker_rss = {pid: _rss(pid) for pid in [*workers, *stack.worker_children()]}
    print(f"memory: node {node_rss / 2**20:.0f} MiB, worker processes "
          f"{sorted(round(v / 2**20) for v in worker_rss.values())} MiB")
    assert node_rss < NODE_RSS_BOUND, f"node RSS {node_rss / 2**20:.0f} MiB"
    assert all(v < WORKER_RSS_BOUND for v in worker_rss.values()), worker_rss


def log_events(stack: NodeStack, name: str, event: str) -> list[str]:
    return [line for line in stack.log_tail(name, 50_000_000).splitlines()
            if f'"event": "{event}"' in line]


def wait_for_log(stack: NodeStack, name: str, event: str, contains: str = "",
                 after: int = 0, timeout_s: float = 60.0) -> str:
    """The first `event` line of a process log (after the first `after` ones) containing text."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in log_events(stack, name, event)[after:] if contains in line]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise TimeoutError(f"no {event} in the {name} log after {timeout_s} s: "
                       f"{stack.log_tail(name)}")

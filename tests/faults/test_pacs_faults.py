"""The PACS misbehaves, then recovers: the results arrive exactly once.

In its place on its port, one after the other: nothing listening (Orthanc stopped), a dcmtk
`storescp --refuse` (association rejected), a `storescp --abort-during` (A-ABORT in the middle
of a C-STORE), and a DICOM peer that answers every C-STORE 0xA700 (out of resources). The
worker retries with backoff inside the task (`send.attempts`); Orthanc is back before the last
attempt, and the deterministic UIDs mean a re-sent object can never be a second copy.

An outage longer than the retries parks the run in failed/; IT's `mammo-node runs retry`
brings it back once the PACS is up (the CLI integration test).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from node.audit import read_audit
from tests.support.fault_stack import (
    assert_delivered_exactly_once,
    log_events,
    new_study,
    runs_of,
    send,
    wait_for_log,
)
from tools.stack.node_stack import SEG_SOP_CLASS, SR_SOP_CLASS, NodeStack
from tools.stack.services import find_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "storescp", "echoscu", "Orthanc", "redis-server"),
]


@contextmanager
def _faulty_pacs(kind: str, ae_title: str, port: int) -> Iterator[None]:
    """A peer that fails in one way, on the PACS's own port, for as long as the block runs."""
    if kind == "not_listening":
        yield
        return
    if kind == "out_of_resources":
        ae = AE(ae_title=ae_title)
        for sop_class in (SR_SOP_CLASS, SEG_SOP_CLASS, "1.2.840.10008.1.1"):
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
        try:
            yield
        finally:
            server.shutdown()
        return
    flag = {"refusing": "--refuse", "aborting": "--abort-during"}[kind]
    process = subprocess.Popen([find_binary("storescp"), "-aet", ae_title, flag, "+xa",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # listening (refusing peers cannot be probed with an echo)
        assert process.poll() is None
        yield
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("kind", "seed"), [("not_listening", 231), ("refusing", 232),
                                            ("aborting", 233), ("out_of_resources", 234)])
def test_pacs_fails_then_recovers_within_the_send_retries(
    stack: NodeStack, tmp_path: Path, kind: str, seed: int
) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=seed)
    retries_before = len(log_events(stack, "worker", "send_retry_scheduled"))
    stack.orthanc.stop()
    try:
        with _faulty_pacs(kind, stack.orthanc.ae_title, stack.orthanc.dicom_port):
            send(stack, paths)
            wait_for_log(stack, "worker", "send_retry_scheduled", after=retries_before,
                         timeout_s=60)
    finally:
        stack.orthanc.start()
    started = time.monotonic()
    record = assert_delivered_exactly_once(stack, study_uid, views=4)
    recovery_s = time.monotonic() - started
    assert record["attempts"] == 1  # scored once; only the sending was retried
    print(f"PACS {kind}: delivered {recovery_s:.1f} s after the PACS came back")


def _cli(stack: NodeStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config",
                           str(stack.config_path)], capture_output=True, text=True,
                          check=False, timeout=60, env=stack.env())


@pytest.mark.timeout(240)
def test_pacs_down_longer_than_the_retries_then_it_retries_the_run(
    stack: NodeStack, tmp_path: Path
) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=235)
    stack.orthanc.stop()
    try:
        send(stack, paths)
        deadline = time.monotonic() + 120
        while not runs_of(stack, study_uid).get("failed") and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        stack.orthanc.start()
    [failed] = runs_of(stack, study_uid)["failed"]
    # the default objects: the SR, the Mammography CAD SR and one SEG per view
    assert failed["error"].startswith("send: pacs: 6 object(s) not stored after 6 attempts")
    listed = _cli(stack, "runs", "list", "--state", "failed")
    assert listed.returncode == 0, listed.stderr
    [line] = [json.loads(x) for x in listed.stdout.splitlines()
              if json.loads(x)["run_id"] == failed["run_id"]]
    assert line["study_uid"] == study_uid and line["error"] == failed["error"]
    assert stack.result_ids(study_uid) == {"sr": [], "seg": []}

    started = time.monotonic()
    retried = _cli(stack, "runs", "retry", failed["run_id"])
    assert retried.returncode == 0, retried.stderr
    record = assert_delivered_exactly_once(stack, study_uid, views=4)
    recovery_s = time.monotonic() - started
    assert record["run_id"] == failed["run_id"] and record["attempts"] == 1  # reset by retry
    events = [(e["event"], e["source"]) for e in read_audit(stack.spool_dir / "audit.jsonl")
              if e.get("run_id") == failed["run_id"]]
    assert events == [("study_queued", "watcher"), ("study_scored", "worker"),
                      ("results_send_failed", "worker"), ("study_failed", "worker"),
                      ("run_retried", "cli"), ("study_scored", "worker"),
                      ("results_sent", "worker")]
    print(f"PACS down past the retries, then `runs retry`: delivered {recovery_s:.1f} s after "
          "the command")

"""A study sent twice, and an instance that arrives after its study was scored.

Policy (docs/RELIABILITY.md): every new arrival for a study already claimed starts a new run
that takes over the instances of the earlier runs and supersedes them. Sent twice: the union
is the same images, so the same SR and SEG UIDs, and the PACS holds one copy. A late instance:
the new run scores all of them; its SR (new UID, since its sources differ) references the union;
the SEGs of images already scored keep their UIDs; the earlier record says `superseded_by`,
and the new SR lists the earlier one as its predecessor document.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from pipelines.sr import read_sr_scores
from tests.support.fault_stack import (
    assert_delivered_exactly_once,
    new_study,
    pacs_objects,
    runs_of,
    send,
    wait_settled,
)
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]


def _wait_runs(stack: NodeStack, study_uid: str, done: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = runs_of(stack, study_uid)
        if len(runs.get("done", [])) >= done and not runs.get("queued") and not runs.get("work"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{done} done runs not reached: {runs_of(stack, study_uid)}")


@pytest.mark.timeout(240)
def test_the_same_study_sent_twice_lands_once(stack: NodeStack, tmp_path: Path) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=241)
    send(stack, paths)
    first = assert_delivered_exactly_once(stack, study_uid, views=4)
    stored = pacs_objects(stack, study_uid)
    send(stack, paths)
    _wait_runs(stack, study_uid, done=2)
    second = assert_delivered_exactly_once(stack, study_uid, views=4)
    assert second["run_id"] != first["run_id"]
    assert second["supersedes"] == [first["run_id"]]
    assert second["instance_count"] == 4  # the union of identical studies: four instances
    [old] = [r for r in runs_of(stack, study_uid)["done"] if r["run_id"] == first["run_id"]]
    assert old["superseded_by"] == second["run_id"]
    assert pacs_objects(stack, study_uid) == stored  # same UIDs: nothing new, nothing twice


@pytest.mark.timeout(240)
def test_late_instance_rescored_with_the_union_superseding_the_first_run(
    stack: NodeStack, tmp_path: Path
) -> None:
    paths, study_uid = new_study(tmp_path / "study", seed=242)
    source_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    send(stack, paths[:3])  # R-CC, L-CC, R-MLO: complete after the quiet period
    stack.wait_for_results(study_uid, seg_count=3)
    [first] = wait_settled(stack, study_uid)["done"]
    first_objects = pacs_objects(stack, study_uid)
    assert len(first_objects["sr"]) == 1 and len(first_objects["seg"]) == 3

    send(stack, paths[3:])  # L-MLO, after the study was scored
    _wait_runs(stack, study_uid, done=2)
    runs = runs_of(stack, study_uid)
    [old] = [r for r in runs["done"] if r["run_id"] == first["run_id"]]
    [new] = [r for r in runs["done"] if r["run_id"] != first["run_id"]]
    assert old["superseded_by"] == new["run_id"] and new["supersedes"] == [first["run_id"]]
    assert new["instance_count"] == 4 and new["missing_views"] == []
    assert {i["sop_uid"] for i in new["inputs"]} == source_uids

    stored = pacs_objects(stack, study_uid)
    new_sr = [o["sop_uid"] for o in new["outputs"] if o["kind"] == "sr"]
    assert stored["sr"] == sorted(first_objects["sr"] + new_sr)  # the old report stays, once
    assert new_sr != first_objects["sr"]
    assert set(first_objects["seg"]) < set(stored["seg"]) and len(stored["seg"]) == 4
    [sr_id] = [i for i in stack.result_ids(study_uid)["sr"]
               if stack.orthanc.instance_tags(i)["SOPInstanceUID"] == new_sr[0]]
    new_report = dcmread(io.BytesIO(stack.orthanc.get_instance_file(sr_id)))
    scores = read_sr_scores(new_report)
    assert set(scores["views_by_sop_uid"]) == source_uids  # the report covers the union
    assert sorted(scores["seg_sop_uids"]) == stored["seg"]
    # ... and says which report it replaces: the old one stays in the PACS, so the reader must
    # be able to tell which is current
    [predecessor] = [item.ReferencedSOPInstanceUID
                     for study in new_report.PredecessorDocumentsSequence
                     for series in study.ReferencedSeriesSequence
                     for item in series.ReferencedSOPSequence]
    assert [predecessor] == first_objects["sr"]
    assert any(text.startswith("This report replaces an earlier report of this study")
               for text in scores["texts"])
    assert stack.echo() == 0

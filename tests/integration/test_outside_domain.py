"""`scoring.outside_domain: skip` on real parts: Redis, Orthanc as the PACS, `mammo-node serve`,
a Celery worker with the shipped bundle (declared domain: MG, MLO, 0.15-0.25 mm pixels).

A study at a digital detector's finer pixel size gets no result object at all, and says why in
its record and the audit trail; a study at a film-like pixel size has its MLO views scored and
its CC views reported as received but not scored, in both SRs, which dciodvfy accepts (the unit
tests of both SRs run pixelmed on the same texts).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from node.audit import read_audit
from pipelines.sr import read_sr_scores
from tests.support.dciodvfy import run_dciodvfy
from tests.support.sr_content import text_values
from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "Orthanc", "redis-server", "dciodvfy"),
]

CAD_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.50"  # Mammography CAD SR


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    node_stack = NodeStack(tmp_path_factory.mktemp("skip"), quiet_period_s=2,
                           config_overrides={"scoring": {"outside_domain": "skip"}})
    try:
        node_stack.start()
        yield node_stack
    finally:
        node_stack.stop()


def _study_uid(paths: list[Path]) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_a_study_at_a_digital_pixel_size_gets_no_results(stack: NodeStack, tmp_path: Path
                                                         ) -> None:
    paths = make_study(tmp_path / "digital", rows=2048, cols=1664, seed=31)  # 0.14 mm pixels
    study_uid = _study_uid(paths)
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr
    record = stack.wait_for_record(study_uid)
    assert record["state"] == "done" and record.get("error") is None
    assert record["not_scored"] == ("no scorable view: outside_domain:pixel_spacing; "
                                    "outside_domain:pixel_spacing,view")
    assert record.get("scores") is None and not record.get("outputs")
    assert all(i["scored"] is False for i in record["inputs"])
    assert stack.result_ids(study_uid) == {"sr": [], "seg": []}
    assert not stack.orthanc.find_instances(study_uid=study_uid, sop_class_uid=CAD_SR_CLASS)
    [event] = [e for e in read_audit(stack.spool_dir / "audit.jsonl")
               if e["event"] == "study_not_scored" and e.get("study_uid") == study_uid]
    assert event["reason"] == record["not_scored"] and event["source"] == "worker"


def test_a_film_sized_study_has_its_mlo_views_scored_and_its_cc_views_said(
        stack: NodeStack, tmp_path: Path) -> None:
    paths = make_study(tmp_path / "film", rows=1280, cols=1040, seed=32)  # 0.224 mm pixels
    study_uid = _study_uid(paths)
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr
    record = stack.wait_for_record(study_uid)
    assert record["state"] == "done" and record.get("error") is None, record.get("error")
    assert sorted(record["scores"]["views"]) == ["L-MLO", "R-MLO"]
    assert record.get("missing_views") in (None, [])
    skipped = {f"{i['laterality']}-{i['view']}": i for i in record["inputs"] if not i["scored"]}
    assert sorted(skipped) == ["L-CC", "R-CC"]
    assert {i["reason"] for i in skipped.values()} == {"outside_domain:view"}

    [sr_id] = stack.wait_for_results(study_uid, seg_count=0)["sr"]
    data = stack.orthanc.get_instance_file(sr_id)
    sr = dcmread(io.BytesIO(data))
    scores = read_sr_scores(sr)
    assert sorted(scores["views"]) == ["L-MLO", "R-MLO"] and scores["missing_views"] == []
    for key in ("R-CC", "L-CC"):
        assert f"{key}: outside the model's declared domain (view); not scored" in scores["texts"]
    [cad_id] = stack.orthanc.find_instances(study_uid=study_uid, sop_class_uid=CAD_SR_CLASS)
    cad_path = tmp_path / "cad-sr.dcm"
    cad_path.write_bytes(stack.orthanc.get_instance_file(cad_id))
    assert any("R-CC: outside the model's declared domain (view); not scored." in text
               for text in text_values(dcmread(cad_path)))
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(data)
    for path in (sr_path, cad_path):
        errors, _ = run_dciodvfy(path)
        assert errors == [], errors

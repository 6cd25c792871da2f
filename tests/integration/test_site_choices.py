"""A site's two choices about what the model's verdicts mean, on real parts: Redis, Orthanc as the
PACS, `mammo-node serve` and a Celery worker with the shipped bundle (declared domain: MG, MLO,
0.15-0.25 mm pixels), configured with `scoring.outside_domain: skip` and `model.operating_point:
high_sensitivity` instead of the defaults (`score`, `balanced`). One stack serves both.

- Outside the domain: a study at a digital detector's finer pixel size gets no result object at
  all, and says why in its record and the audit trail; a study at a film-like pixel size has its
  MLO views scored and its CC views reported as received but not scored, in both SRs, which
  dciodvfy accepts (the unit tests of both SRs run pixelmed on the same texts).
- The operating point: the record, both SRs and the verdicts are taken at `high_sensitivity`; a
  worker configured with a point the bundle does not declare refuses to start with one line
  naming it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from node.audit import read_audit
from pipelines.sr import read_sr_scores
from tests.support.dciodvfy import run_dciodvfy
from tests.support.sr_content import text_values
from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "Orthanc", "redis-server", "dciodvfy"),
]

CAD_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.50"  # Mammography CAD SR
POINTS = json.loads((DEFAULT_BUNDLE / "metadata.json").read_text())["operating_points"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    node_stack = NodeStack(tmp_path_factory.mktemp("choices"), quiet_period_s=2,
                           config_overrides={"scoring": {"outside_domain": "skip"},
                                             "model": {"bundle_dir": str(DEFAULT_BUNDLE),
                                                       "operating_point": "high_sensitivity"}})
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


def test_the_verdicts_are_taken_at_the_configured_point(stack: NodeStack, tmp_path: Path
                                                        ) -> None:
    point = POINTS["high_sensitivity"]
    paths = make_study(tmp_path / "study", rows=1280, cols=1040, seed=41)  # MLO views scored
    study_uid = _study_uid(paths)
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr
    record = stack.wait_for_record(study_uid)
    assert record["state"] == "done" and record.get("error") is None, record.get("error")
    scores = record["scores"]
    assert scores["operating_point"] == point
    assert scores["suspicious"] == (scores["exam"] >= point)

    segs = [o for o in record["outputs"] if o["kind"] == "seg"]
    [sr_id] = stack.wait_for_results(study_uid, seg_count=len(segs))["sr"]
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(stack.orthanc.get_instance_file(sr_id))
    texts = read_sr_scores(dcmread(io.BytesIO(sr_path.read_bytes())))["texts"]
    verdict = "suspicious" if scores["exam"] >= point else "not suspicious"
    assert any(text.startswith(f"Exam abnormality score {scores['exam']:.3f}: {verdict} at "
                               f"operating point {point:g} (high_sensitivity)") for text in texts)
    [cad_id] = stack.orthanc.find_instances(study_uid=study_uid, sop_class_uid=CAD_SR_CLASS)
    cad_path = tmp_path / "cad-sr.dcm"
    cad_path.write_bytes(stack.orthanc.get_instance_file(cad_id))
    assert any(f"at the high_sensitivity operating point {point:g}" in text
               for text in text_values(dcmread(cad_path)))
    for path in (sr_path, cad_path):
        errors, _ = run_dciodvfy(path)
        assert errors == [], errors


def test_a_worker_refuses_a_point_its_bundle_does_not_declare(stack: NodeStack, tmp_path: Path
                                                              ) -> None:
    config = yaml.safe_load(stack.config_path.read_text())
    config["model"]["operating_point"] = "strict"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "node.cli", "worker", "--config", str(bad)],
                            capture_output=True, text=True, check=False, timeout=120,
                            env=stack.env())
    assert result.returncode == 2
    assert "model bundle rejected" in result.stderr
    assert "operating point 'strict' is not one the bundle declares" in result.stderr
    assert "balanced, exam_specificity_90, high_sensitivity" in result.stderr
    # A threads pool loads the bundle in the worker's own process: refused there the same way.
    threads = subprocess.run([sys.executable, "-m", "node.cli", "worker", "--config", str(bad),
                              "--threads", "2"],
                             capture_output=True, text=True, check=False, timeout=120,
                             env=stack.env())
    assert threads.returncode == 2
    assert threads.stderr.strip().splitlines()[-1] == result.stderr.strip().splitlines()[-1]

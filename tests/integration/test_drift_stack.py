"""Drift and input quality on real parts: a study with an implant image goes through storescu,
the node, Redis and a Celery worker; the record carries the image's quality flag, the worker
counts it, `serve` exports the source's drift gauges from the worker's rolling store, and
`mammo-node drift` reports the source."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, ROOT, NodeStack
from tools.stack.services import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]

BUNDLE = json.loads((DEFAULT_BUNDLE / "metadata.json").read_text())
SOURCE = (f'calling_ae="STORESCU",manufacturer="mammo-node synthetic",'
          f'model="{BUNDLE["name"]}",model_version="{BUNDLE["version"]}"')


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    monitoring = {"port": free_port(), "worker_port": free_port(), "worker_port_count": 1,
                  "heartbeat_interval_s": 1, "worker_silent_after_s": 10}
    node_stack = NodeStack(tmp_path_factory.mktemp("drift"), quiet_period_s=2,
                           config_overrides={"monitoring": monitoring,
                                             "drift": {"window": 20, "min_exams": 5}})
    try:
        node_stack.start()
        yield node_stack
    finally:
        node_stack.stop()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, labels: str) -> float | None:
    match = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_quality_flags_and_drift_gauges_through_a_real_stack(stack: NodeStack, tmp_path: Path
                                                            ) -> None:
    paths = make_study(tmp_path / "study", rows=256, cols=208, seed=11)
    implant = next(p for p in paths if p.name == "R-CC.dcm")
    ds = dcmread(implant)
    ds.BreastImplantPresent = "YES"
    ds.save_as(implant, enforce_file_format=True)
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr
    record = stack.wait_for_record(str(ds.StudyInstanceUID))
    assert record["state"] == "done", record

    flags = {i["view"] + i["laterality"]: i.get("quality_flags") or [] for i in record["inputs"]}
    # Outside the shipped bundle's declared domain (film MLO at 0.2 mm): every view's pixel size
    # (a 256-row synthetic image covers the detector with ~1 mm pixels), and the CC views.
    outside = {key: [f for f in found if f.startswith("outside_domain:")]
               for key, found in flags.items()}
    assert outside == {"CCR": ["outside_domain:pixel_spacing", "outside_domain:view"],
                       "CCL": ["outside_domain:pixel_spacing", "outside_domain:view"],
                       "MLOR": ["outside_domain:pixel_spacing"],
                       "MLOL": ["outside_domain:pixel_spacing"]}
    assert {key: [f for f in found if f not in outside[key]] for key, found in flags.items()} == {
        "CCR": ["implant_present"], "CCL": [], "MLOR": [], "MLOL": []}

    monitoring = stack.config()["monitoring"]
    worker = _metrics(monitoring["worker_port"])
    assert _sample(worker, "mammo_input_quality_flags_total", 'flag="implant_present"') == 1.0

    # serve reads the worker's rolling store at the scrape: the source is there with its PSI
    # against the shipped bundle's out-of-fold reference.
    deadline = time.monotonic() + 30
    while (exams := _sample(_metrics(monitoring["port"]), "mammo_score_drift_exams", SOURCE)
           ) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert exams == 1.0
    served = _metrics(monitoring["port"])
    psi = _sample(served, "mammo_score_drift_psi", SOURCE)
    ks = _sample(served, "mammo_score_drift_ks", SOURCE)
    assert psi is not None and psi >= 0 and ks is not None and 0 < ks <= 1

    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, "-m", "node.cli", "drift", "--config", str(stack.config_path),
         "--out", str(out)], cwd=ROOT, env=stack.env(), capture_output=True, text=True,
        timeout=120, check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    [row] = json.loads((out / "drift.json").read_text())["sources"]
    assert (row["calling_ae"], row["exams"], row["images"], row["verdict"]) == (
        "STORESCU", 1, 4, "too few exams")
    assert row["mean_exam_score"] == record["scores"]["exam"]
    assert row["psi"] == pytest.approx(psi, abs=1e-6)
    assert "| STORESCU | mammo-node synthetic | 1 | 4 |" in (out / "report.md").read_text()
    # the worker kept the bundle's points with its reference: the exam against each of them,
    # and the point the run's verdict was taken at agrees with the record
    points = {p["name"]: p for p in row["points"]}
    assert set(points) == set(BUNDLE["operating_points"])
    balanced = points["balanced"]
    assert balanced["exams_at_or_above"] == int(record["scores"]["suspicious"])
    assert balanced["normal_exam_flag_rate"] == pytest.approx(
        1 - BUNDLE["operating_points_detail"]["balanced"]["exam_specificity"])
    assert (out / "drift.png").stat().st_size > 1000

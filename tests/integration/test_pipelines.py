"""Two called AE titles on one listener, two pipelines, two bundles, two destinations, on real
parts: `serve`, one Celery worker per pipeline (`mammo-node worker --pipeline NAME`), Redis,
Orthanc for one pipeline's results and a dcmtk storescp archive for the other's.

- The same study sent to each AE title makes one run per pipeline, each scored by its own
  pipeline's bundle (the records name different models) and sent to its own destination only.
- A caller allowed on one AE title is refused on the other with an A-ASSOCIATE-RJ (rejected
  permanent, calling AE title not recognised).
- A SOP class one pipeline does not take is refused at negotiation for its AE title.
- The `screen` pipeline has a shadow bundle: its scores are in the record beside the live ones,
  while the PACS holds only the live results; `mammo-node shadow report` compares them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from node.vocabulary import COMPREHENSIVE_3D_SR, MG_FOR_PRESENTATION
from tests.support.bundles import renamed_bundle
from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, NODE_AE_TITLE, ROOT, NodeStack
from tools.stack.services import find_binary, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "storescp", "echoscu", "Orthanc", "redis-server"),
]

ROWS, COLS = 256, 208
RESEARCH_AE = "MAMMO_RESEARCH"
RESEARCH_CALLER = "RESEARCH_SCU"


def _wait_for_log(stack: NodeStack, name: str, text: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in stack.log_tail(name, 1_000_000):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{name}: no {text!r}: {stack.log_tail(name)}")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pipelines")
    research_bundle = renamed_bundle(root / "bundles" / "research", "mias-research", "9.1.0")
    shadow_bundle = renamed_bundle(root / "bundles" / "shadow", "mias-candidate", "0.3.0")
    archive_dir = root / "archive"
    archive_dir.mkdir()
    archive_port = free_port()
    archive = subprocess.Popen([find_binary("storescp"), "-aet", "ARCHIVE", "-od",
                                str(archive_dir), "+xa", str(archive_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack = NodeStack(root / "stack", quiet_period_s=2, with_worker=False)
    stack.config_overrides = {
        "destinations": [
            {"name": "pacs", "ae_title": stack.orthanc.ae_title, "host": "127.0.0.1",
             "port": stack.orthanc.dicom_port, "timeout_s": 30},
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
             "port": archive_port, "timeout_s": 30},
        ],
        "pipelines": [
            {"name": "screen", "ae_title": NODE_AE_TITLE,
             "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"},
                                 {"ae_title": stack.orthanc.ae_title, "host": "127.0.0.1"}],
             "model": {"bundle_dir": str(DEFAULT_BUNDLE)},
             "shadow_model": {"bundle_dir": str(shadow_bundle)},
             "destinations": ["pacs"]},
            {"name": "research", "ae_title": RESEARCH_AE,
             "allowed_callers": [{"ae_title": RESEARCH_CALLER, "host": "127.0.0.1"}],
             "sop_classes": ["DigitalMammographyXRayImageStorageForPresentation"],
             "completion": {"quiet_period_s": 1, "deadline_s": 60, "poll_interval_s": 0.2},
             "model": {"bundle_dir": str(research_bundle)},
             "destinations": ["archive"]},
        ],
    }
    workers: list[subprocess.Popen[bytes]] = []
    try:
        stack.start()
        for name in ("screen", "research"):
            workers.append(stack._spawn(f"worker-{name}", "worker", "--pipeline", name))
        for name in ("screen", "research"):
            _wait_for_log(stack, f"worker-{name}", '"event": "model_loaded"')
        yield {"stack": stack, "archive": archive_dir, "root": root}
    finally:
        for worker in workers:  # spawned here: stopped here (each its own process group)
            NodeStack._terminate(worker)
        stack.stop()
        archive.terminate()
        archive.wait(10)


def _records(stack: NodeStack, study_uid: str, count: int, timeout_s: float = 240.0
             ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [r for state in ("done", "failed") for r in stack.records(state)
                 if r.get("study_uid") == study_uid]
        if len(found) >= count:
            return found
        time.sleep(0.3)
    raise TimeoutError(f"{count} records not there: {stack.log_tail('node')} "
                       f"{stack.log_tail('worker-screen')} {stack.log_tail('worker-research')}")


def test_two_ae_titles_two_bundles_two_destinations(pipelines: dict[str, Any],
                                                    tmp_path: Path) -> None:
    stack: NodeStack = pipelines["stack"]
    paths = make_study(tmp_path / "study", views=["R-CC", "L-CC"], rows=ROWS, cols=COLS, seed=311)
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)

    # A caller of one pipeline is a stranger to the other: A-ASSOCIATE-RJ, nothing stored.
    refused = stack.storescu(paths, calling_ae=RESEARCH_CALLER, called_ae=NODE_AE_TITLE)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    refused = stack.storescu(paths, calling_ae="STORESCU", called_ae=RESEARCH_AE)
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr

    # The same study to both AE titles: one run per pipeline.
    assert stack.storescu(paths, calling_ae="STORESCU").returncode == 0
    sent = stack.storescu(paths, calling_ae=RESEARCH_CALLER, called_ae=RESEARCH_AE)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    records = {r.get("pipeline"): r for r in _records(stack, study_uid, 2)}
    assert set(records) == {"screen", "research"}
    screen, research = records["screen"], records["research"]
    assert screen["state"] == research["state"] == "done", json.dumps(records)[:3000]
    assert screen["model"] == {"name": "mias-baseline",
                               "version": json.loads((DEFAULT_BUNDLE / "metadata.json")
                                                     .read_text())["version"]}
    assert research["model"] == {"name": "mias-research", "version": "9.1.0"}
    assert screen["run_id"] != research["run_id"]
    assert {s["destination"] for s in screen["sends"]} == {"pacs"}
    assert {s["destination"] for s in research["sends"]} == {"archive"}
    assert all(s["ok"] for s in screen["sends"] + research["sends"])

    # The shadow scored the screen run's views without sending anything; the research
    # pipeline has no shadow.
    shadow = screen["shadow"]
    assert shadow["model"] == {"name": "mias-candidate", "version": "0.3.0"}
    assert set(shadow["scores"]["views"]) == set(screen["scores"]["views"]) == {"R-CC", "L-CC"}
    # Same weights under another name: the same scores (the comparison is meaningful).
    assert shadow["scores"]["exam"] == pytest.approx(screen["scores"]["exam"], abs=1e-5)
    assert "shadow" not in research

    # Each destination holds its own pipeline's results and nothing of the shadow: Orthanc has
    # exactly the screen run's objects, the archive exactly the research run's.
    orthanc_sops = set()
    for instance in stack.orthanc.find_instances(study_uid=study_uid):
        tags = stack.orthanc.instance_tags(instance)
        orthanc_sops.add(tags["SOPInstanceUID"])
    results_in_pacs = orthanc_sops - {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                      for p in paths}
    assert results_in_pacs == {o["sop_uid"] for o in screen["outputs"]}
    assert stack.orthanc.find_instances(study_uid=study_uid,
                                        sop_class_uid=str(COMPREHENSIVE_3D_SR)) != []
    archived = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in pipelines["archive"].rglob("*") if p.is_file()}
    assert archived == {o["sop_uid"] for o in research["outputs"]}

    # The comparison report reads the records.
    report = subprocess.run(
        [sys.executable, "-m", "node.cli", "shadow", "report", "--config", str(stack.config_path),
         "--json"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert report.returncode == 0, report.stderr
    [comparison] = json.loads(report.stdout)["comparisons"]
    assert comparison["pipeline"] == "screen" and comparison["studies"] == 1
    assert comparison["agreement"] == 1.0


def test_sop_class_outside_a_pipeline_is_refused_at_negotiation(pipelines: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    stack: NodeStack = pipelines["stack"]
    paths = make_study(tmp_path / "processing", views=["R-CC"], rows=ROWS, cols=COLS, seed=312,
                       sop_class="processing")
    assert str(dcmread(paths[0], stop_before_pixels=True).SOPClassUID) != str(MG_FOR_PRESENTATION)
    refused = stack.storescu(paths, calling_ae=RESEARCH_CALLER, called_ae=RESEARCH_AE)
    assert "No presentation context" in refused.stdout + refused.stderr
    audit = (stack.spool_dir / "audit.jsonl").read_text()
    refusal = [json.loads(line) for line in audit.splitlines()
               if '"presentation_contexts_refused"' in line and RESEARCH_AE in line]
    assert refusal and refusal[-1]["refused"][0]["reason"] == "abstract_syntax_not_supported"


def test_selftest_goes_through_the_chosen_pipeline(pipelines: dict[str, Any]) -> None:
    stack: NodeStack = pipelines["stack"]
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "selftest", "--config", str(stack.config_path),
         "--pipeline", "research", "--timeout-s", "180"],
        capture_output=True, text=True, cwd=ROOT, env=stack.env(), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{RESEARCH_CALLER} -> {RESEARCH_AE}@" in result.stdout
    assert "archive: " in result.stdout and "pacs:" not in result.stdout

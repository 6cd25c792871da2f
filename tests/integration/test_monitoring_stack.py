"""Monitoring on real parts: a real Prometheus scrapes `serve` and a Celery worker (bearer token)
while a study goes through Redis, the node, the worker and Orthanc; `mammo-node status` reads the
same stack, then sees the worker go silent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from node.runs import FailureKind, RunFailure, RunRecord, write_record
from tests.support.prometheus import PrometheusService
from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, ROOT, NodeStack
from tools.stack.services import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server", "prometheus"),
]

TOKEN_ENV = "MAMMO_MONITORING_TOKEN"
TOKEN = "monitoring-test-token"
ALERTS = ROOT / "config" / "monitoring" / "alerts.yml"
DASHBOARD = ROOT / "config" / "monitoring" / "grafana-dashboard.json"
BUNDLE = json.loads((DEFAULT_BUNDLE / "metadata.json").read_text())
SILENT_AFTER_S = 8.0
CANARIES = {"patient_name": "CANARY^METRICS", "patient_id": "PID-CANARY-METRICS",
            "accession": "ACC-CANARY-MTR"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)  # NodeStack hands os.environ to serve and the worker
        monitoring = {"port": free_port(), "worker_port": free_port(), "worker_port_count": 1,
                      "token_env": TOKEN_ENV, "heartbeat_interval_s": 1,
                      "worker_silent_after_s": SILENT_AFTER_S}
        node_stack = NodeStack(tmp_path_factory.mktemp("monitoring"), quiet_period_s=2,
                               config_overrides={"monitoring": monitoring})
        try:
            node_stack.start()
            yield node_stack
        finally:
            node_stack.stop()


@pytest.fixture(scope="module")
def prometheus(stack: NodeStack, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[PrometheusService]:
    monitoring = stack.config()["monitoring"]
    service = PrometheusService(
        tmp_path_factory.mktemp("prometheus"),
        {"mammo-node": f"127.0.0.1:{monitoring['port']}",
         "mammo-worker": f"127.0.0.1:{monitoring['worker_port']}"},
        token=TOKEN, rule_files=[ALERTS])
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def canary_run(stack: NodeStack, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[list[Path], dict[str, Any]]:
    """One study with canary patient values, sent through the stack: its paths and its record.

    Every test of the module builds on it, so each holds whichever way the tests are scheduled."""
    paths = make_study(tmp_path_factory.mktemp("study"), rows=256, cols=208, seed=7, **CANARIES)
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    record = stack.wait_for_record(study_uid)
    assert record["state"] == "done", record
    return paths, record


def _value(result: list[dict[str, Any]]) -> float:
    return sum(float(item["value"][1]) for item in result)


def _status(stack: NodeStack, *args: str, config: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--config", str(config or stack.config_path),
         *args], cwd=ROOT, env=stack.env(), capture_output=True, text=True, timeout=60,
        check=False)


def test_prometheus_scrapes_node_and_worker_through_a_study(
        stack: NodeStack, prometheus: PrometheusService,
        canary_run: tuple[list[Path], dict[str, Any]]) -> None:
    up = prometheus.wait_for('up == 1', lambda r: len(r) == 2)
    assert {item["metric"]["job"] for item in up} == {"mammo-node", "mammo-worker"}
    paths, record = canary_run

    # serve: the listener's counters and the spool's state
    received = prometheus.wait_for('mammo_instances_received_total{calling_ae="STORESCU"}',
                                   lambda r: _value(r) >= len(paths))
    assert received[0]["metric"]["job"] == "mammo-node"
    prometheus.wait_for('mammo_associations_total{outcome="accepted"}', lambda r: _value(r) >= 1)
    prometheus.wait_for('mammo_runs{state="done"}', lambda r: _value(r) >= 1)
    assert prometheus.query("mammo_queue_depth")  # the broker answered the scrape
    # the worker's pool child, through the multiprocess files and the parent's endpoint
    scores = prometheus.wait_for("mammo_exam_score_count", lambda r: _value(r) >= 1)
    labels = scores[0]["metric"]
    assert labels["job"] == "mammo-worker"
    assert (labels["model"], labels["model_version"]) == (BUNDLE["name"], BUNDLE["version"])
    assert (labels["calling_ae"], labels["manufacturer"]) == ("STORESCU", "mammo-node synthetic")
    # the exam's verdict at the configured point (the default: balanced), as the record says it
    verdict = "suspicious" if record["scores"]["suspicious"] else "not_suspicious"
    verdicts = prometheus.wait_for(
        f'mammo_exam_verdicts_total{{operating_point="balanced",verdict="{verdict}"}}',
        lambda r: _value(r) >= 1)
    assert verdicts[0]["metric"]["calling_ae"] == "STORESCU"
    # what the bundle's cross-validation flagged among normal exams at that point, and the
    # recording rules of the recall-rate alerts built on both: this source's expected count
    # (0 here: increase() needs a second sample of a counter, and this source sent one exam)
    expected = 1 - BUNDLE["operating_points_detail"]["balanced"]["exam_specificity"]
    [rate] = prometheus.wait_for(
        'mammo_model_normal_exam_flag_rate{operating_point="balanced"}')
    assert rate["metric"]["job"] == "mammo-worker"
    assert abs(float(rate["value"][1]) - expected) < 1e-9
    [source] = prometheus.wait_for(
        'source:mammo_exams_flagged_expected:increase1d{calling_ae="STORESCU"}')
    assert source["metric"]["operating_point"] == "balanced" and float(source["value"][1]) >= 0
    assert prometheus.wait_for('source:mammo_exams_flagged_excess:zscore1d{calling_ae="STORESCU"}')
    assert _value(prometheus.query('mammo_runs_finished_total{state="done"}')) >= 1
    assert _value(prometheus.query('mammo_stage_duration_seconds_count{stage="inference"}')) >= 1
    assert _value(prometheus.query(
        'mammo_sends_total{destination="pacs",outcome="stored"}')) == len(record["sends"])
    # the heartbeat, exported by serve with the bundle the worker loaded
    [beat] = prometheus.wait_for("mammo_worker_last_seen_age_seconds")
    assert (beat["metric"]["model"], beat["metric"]["model_version"]) == (
        BUNDLE["name"], BUNDLE["version"])
    assert float(beat["value"][1]) < SILENT_AFTER_S

    # The shipped rules load and evaluate in this Prometheus; every dashboard query parses.
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules and all(rule["health"] != "err" for rule in rules), rules
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            prometheus.query(target["expr"])  # raises on a PromQL error


def _get(port: int, path: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


def test_no_phi_in_metrics_readiness_or_status(
        stack: NodeStack, prometheus: PrometheusService,
        canary_run: tuple[list[Path], dict[str, Any]]) -> None:
    """After the canary study: no patient value and no UID in anything monitoring shows."""
    monitoring = stack.config()["monitoring"]
    _, record = canary_run
    shown = [_get(port, path)[1] for port in (monitoring["port"], monitoring["worker_port"])
             for path in ("/metrics", "/readyz")]
    shown.append(_status(stack, "--json").stdout)
    for text in shown:
        for value in (*CANARIES.values(), "CANARY", record["study_uid"]):
            assert value not in text


def test_readyz_of_serve_and_worker(stack: NodeStack, prometheus: PrometheusService) -> None:
    monitoring = stack.config()["monitoring"]
    for port, expected in ((monitoring["port"], "workers"), (monitoring["worker_port"], "model")):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            report = json.load(response)
        assert response.status == 200 and report["ready"] is True, report
        assert report["checks"][expected]["ok"]


def test_status_reports_the_stack_and_fails_when_something_is_wrong(
        stack: NodeStack, prometheus: PrometheusService, tmp_path: Path,
        canary_run: tuple[list[Path], dict[str, Any]]) -> None:
    result = _status(stack, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["runs"]["done"] >= 1 and report["queue_depth"] == 0
    [worker] = report["workers"]
    assert worker["alive"] and worker["model"] == BUNDLE["name"] and worker["ready"] >= 1
    assert worker["port"] == stack.config()["monitoring"]["worker_port"]
    human = _status(stack)
    assert human.returncode == 0 and "workers:  1 alive of 1 known" in human.stdout, human.stdout

    # A failed run shows with its typed reason (no PHI: the message is the node's own).
    failed = stack.spool_dir / "failed" / "20260101T000000-monitoringtest"
    failed.mkdir(parents=True)
    write_record(failed, RunRecord(run_id=failed.name, study_uid="1.2.3.4", state="failed",
                                   error=RunFailure(kind=FailureKind.SEND,
                                                    message="pacs: 2 object(s) not stored")))
    report = json.loads(_status(stack, "--json").stdout)
    assert report["failures"][0]["run_id"] == failed.name
    assert report["failures"][0]["error_kind"] == "send"

    # Disk below the watermark: exit 1, the check named.
    config = yaml.safe_load(stack.config_path.read_text())
    config["spool"]["min_free_bytes"] = 2**62
    high_watermark = tmp_path / "node.yaml"
    high_watermark.write_text(yaml.safe_dump(config))
    result = _status(stack, "--json", config=high_watermark)
    assert result.returncode == 1
    assert any(p.startswith("spool_disk") for p in json.loads(result.stdout)["problems"])

    # The worker dies without a goodbye: its heartbeat ages past the limit, status says so.
    stack.kill_worker()
    time.sleep(SILENT_AFTER_S)  # not a timing assertion: the earliest the beat can be stale
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = _status(stack)
        if result.returncode == 1:
            break
        time.sleep(1)
    assert result.returncode == 1, result.stdout
    assert "[SILENT]" in result.stdout and "PROBLEM: workers" in result.stdout
    age = prometheus.wait_for(f"mammo_worker_last_seen_age_seconds > {SILENT_AFTER_S}")
    assert age[0]["metric"]["model"] == BUNDLE["name"]

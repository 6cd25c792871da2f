"""The shipped alert rules and Grafana dashboard: valid, and naming only metrics the node exports.

`promtool` (Debian's `prometheus` package) judges the rules: `check rules`, then `test rules`
with synthetic series for the alerts whose logic is not obvious (drift PSI, input-quality flags,
silent worker, no worker, disk watermark, recall rate per source). A real Prometheus loads the same file in
tests/integration/test_monitoring_stack.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.metrics import exported_names

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config" / "monitoring" / "alerts.yml"
DASHBOARD = ROOT / "config" / "monitoring" / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"(?<![\w:])mammo_[a-z0-9_]+\b")  # not inside a recorded name
RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")  # level:metric:operations

pytestmark = pytest.mark.requires_bin("promtool")


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alert_exprs() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in _rules() if "alert" in rule}


def _recorded() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}


def _panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            if panel["type"] != "row" for target in panel["targets"]]


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_and_panels_name_only_exported_metrics() -> None:
    known = exported_names()
    sources = [(f"alert {name}", expr) for name, expr in _alert_exprs().items()]
    sources += [(f"record {name}", expr) for name, expr in _recorded().items()]
    sources += [(f"panel {title!r}", expr) for title, expr in _panel_exprs()]
    unknown = {(where, name) for where, expr in sources for name in METRIC_NAME.findall(expr)
               if name not in known}
    assert not unknown
    recorded = set(_recorded())
    assert all(RECORDED_NAME.fullmatch(name) for name in recorded)
    unrecorded = {(where, name) for where, expr in sources
                  for name in RECORDED_NAME.findall(expr) if name not in recorded}
    assert not unrecorded
    assert all(METRIC_NAME.search(expr) for title, expr in _panel_exprs()), "a panel without a node metric"


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["type"] == "prometheus"
    expected = {"mammo_runs", "mammo_exam_score_sum", "mammo_worker_last_seen_age_seconds",
                "mammo_stage_duration_seconds_bucket", "mammo_sends_total", "mammo_queue_depth"}
    named = {name for _, expr in _panel_exprs() for name in METRIC_NAME.findall(expr)}
    assert expected <= named


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _expected(rule_file: dict[str, Any], alert: str, labels: dict[str, str]) -> dict[str, Any]:
    """The alert as it must fire: its rule's labels plus the labels of the series it fires for."""
    rule = next(r for g in rule_file["groups"] for r in g["rules"] if r.get("alert") == alert)
    return {"exp_labels": {**rule.get("labels", {}), **labels}}


def _strip_annotations(rule_file: dict[str, Any]) -> dict[str, Any]:
    for group in rule_file["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return rule_file


def test_the_alerts_fire_for_the_right_series(tmp_path: Path) -> None:
    # The rules as shipped, annotations left out so the test checks who fires, not the wording.
    rules = _strip_annotations(yaml.safe_load(ALERTS.read_text()))
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    drifting = {"model": "m", "model_version": "1", "calling_ae": "MG_DRIFT", "manufacturer": "V"}
    steady = {**drifting, "calling_ae": "MG_STEADY"}
    few = {**drifting, "calling_ae": "MG_FEW"}
    retired = {**drifting, "model_version": "0"}
    worker = {"worker": "host:42", "model": "m", "model_version": "1"}
    worker_job = {"job": "mammo-worker", "instance": "w:9465"}
    node_job = {"job": "mammo-node", "instance": "n:9464"}
    point = {"model": "m", "model_version": "1", "operating_point": "balanced"}
    recall_high = {**point, "calling_ae": "MG_HIGH", "manufacturer": "V"}
    recall_usual = {**recall_high, "calling_ae": "MG_USUAL"}
    recall_none = {**recall_high, "calling_ae": "MG_NONE"}
    recall_few = {**recall_high, "calling_ae": "MG_FEW"}
    recall_unknown = {**recall_high, "model_version": "0"}
    tests = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "5m",
        "tests": [
            {   # PSI per source from serve: one source drifts with a full window, one drifts
                # with too few exams, one is steady; a retired model version drifts unwatched
                "interval": "10m",
                "input_series": [
                    _series("mammo_score_drift_psi", {**drifting, **node_job}, "0.05x6 0.4x20"),
                    _series("mammo_score_drift_exams", {**drifting, **node_job}, "200x26"),
                    _series("mammo_score_drift_psi", {**few, **node_job}, "0.6x26"),
                    _series("mammo_score_drift_exams", {**few, **node_job}, "12x26"),
                    _series("mammo_score_drift_psi", {**steady, **node_job}, "0.04x26"),
                    _series("mammo_score_drift_exams", {**steady, **node_job}, "200x26"),
                    _series("mammo_score_drift_psi", {**retired, **node_job}, "0.9x26"),
                    _series("mammo_score_drift_exams", {**retired, **node_job}, "200x26"),
                    _series("mammo_worker_ready_processes", {**worker, **node_job}, "1x26"),
                    _series("mammo_input_quality_flags_total", {"flag": "wrong_body_part",
                                                                **worker_job}, "0 0 0 0+2x22"),
                    _series("mammo_input_quality_flags_total", {"flag": "implant_present",
                                                                **worker_job}, "0+5x25"),
                ],
                "alert_rule_test": [
                    {"eval_time": "2h30m", "alertname": "MammoScoreDrift",
                     "exp_alerts": [_expected(rules, "MammoScoreDrift", drifting)]},
                    {"eval_time": "90m", "alertname": "MammoScoreDrift", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "MammoInputQualityFlags", "exp_alerts": []},
                    {"eval_time": "2h", "alertname": "MammoInputQualityFlags",
                     "exp_alerts": [_expected(rules, "MammoInputQualityFlags",
                                              {"flag": "wrong_body_part"})]},
                ],
            },
            {   # a heartbeat that stops ageing in real time: silent, then no worker at all
                "interval": "1m",
                "input_series": [
                    _series("mammo_worker_last_seen_age_seconds", {**worker, **node_job},
                            "5 5 5 5 60+60x20"),
                    _series("mammo_worker_ready_processes", {**worker, **node_job}, "1x25"),
                    _series("up", node_job, "1x25"),
                    _series("mammo_spool_free_bytes", node_job, "5000x10 500x15"),
                    _series("mammo_spool_min_free_bytes", node_job, "1000x25"),
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "MammoWorkerSilent", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "MammoNoWorker", "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "MammoWorkerSilent",
                     "exp_alerts": [_expected(rules, "MammoWorkerSilent", {**worker, **node_job})]},
                    {"eval_time": "10m", "alertname": "MammoNoWorker",
                     "exp_alerts": [_expected(rules, "MammoNoWorker", {})]},
                    {"eval_time": "5m", "alertname": "MammoSpoolBelowWatermark", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "MammoSpoolBelowWatermark",
                     "exp_alerts": [_expected(rules, "MammoSpoolBelowWatermark", node_job)]},
                ],
            },
            {   # recall rate per source over a day, against the bundle's 0.396 of normal exams
                # flagged: 100 exams a day each (0.7 per 10 minutes)
                "interval": "10m",
                "input_series": [
                    _series("mammo_model_normal_exam_flag_rate", {**point, **worker_job},
                            "0.396x200"),
                    # 80 % flagged: far above
                    _series("mammo_exam_verdicts_total", {**recall_high, **worker_job,
                                                          "verdict": "suspicious"}, "0+0.56x200"),
                    _series("mammo_exam_verdicts_total", {**recall_high, **worker_job,
                                                          "verdict": "not_suspicious"},
                            "0+0.14x200"),
                    # 42 % flagged: within the noise
                    _series("mammo_exam_verdicts_total", {**recall_usual, **worker_job,
                                                          "verdict": "suspicious"}, "0+0.294x200"),
                    _series("mammo_exam_verdicts_total", {**recall_usual, **worker_job,
                                                          "verdict": "not_suspicious"},
                            "0+0.406x200"),
                    # nothing flagged at all (the suspicious series never appears): far below
                    _series("mammo_exam_verdicts_total", {**recall_none, **worker_job,
                                                          "verdict": "not_suspicious"}, "0+0.7x200"),
                    # every exam flagged, but 20 a day: too few to judge
                    _series("mammo_exam_verdicts_total", {**recall_few, **worker_job,
                                                          "verdict": "suspicious"}, "0+0.14x200"),
                    # a bundle that gives no exam figure: never judged
                    _series("mammo_exam_verdicts_total", {**recall_unknown, **worker_job,
                                                          "verdict": "not_suspicious"}, "0+0.7x200"),
                ],
                "alert_rule_test": [
                    {"eval_time": "8h", "alertname": "MammoRecallRateHigh", "exp_alerts": []},
                    {"eval_time": "8h", "alertname": "MammoRecallRateLow", "exp_alerts": []},
                    {"eval_time": "30h", "alertname": "MammoRecallRateHigh",
                     "exp_alerts": [_expected(rules, "MammoRecallRateHigh", recall_high)]},
                    {"eval_time": "30h", "alertname": "MammoRecallRateLow",
                     "exp_alerts": [_expected(rules, "MammoRecallRateLow", recall_none)]},
                ],
            },
            {   # sends: a PACS that refuses one object kind pages as one that fails; stored
                # objects and a destination whose failures are over do not
                "interval": "1m",
                "input_series": [
                    _series("mammo_sends_total", {"destination": "refusing", **worker_job,
                                                  "outcome": "refused"}, "0+1x30"),
                    _series("mammo_sends_total", {"destination": "failing", **worker_job,
                                                  "outcome": "failed"}, "0+1x30"),
                    _series("mammo_sends_total", {"destination": "healthy", **worker_job,
                                                  "outcome": "stored"}, "0+5x30"),
                    _series("mammo_sends_total", {"destination": "recovered", **worker_job,
                                                  "outcome": "failed"}, "0+1x5 5+0x25"),
                ],
                "alert_rule_test": [
                    {"eval_time": "29m", "alertname": "MammoSendsFailing",
                     "exp_alerts": [_expected(rules, "MammoSendsFailing", {"destination": name})
                                    for name in ("failing", "refusing")]},
                ],
            },
        ],
    }
    test_path = tmp_path / "alerts-test.yml"
    test_path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", str(test_path)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

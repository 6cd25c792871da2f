"""The monitoring endpoint, the metric definitions and the worker's multiprocess metrics.

The endpoint is a real HTTP(S) server on a free loopback port; the multiprocess test forks real
processes that write prometheus_client's files the way Celery's pool children do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from node import metrics
from node.errors import ConfigError
from node.monitoring import (
    MonitoringServer,
    WorkerBeat,
    WorkerMonitor,
    publish_heartbeat,
    read_heartbeats,
    start_node_monitoring,
    take_snapshot,
)
from node.runs import FailureKind, ModelRef, RunFailure, RunRecord, Scores, SendResult
from node.settings import load_settings
from node.spool import Spool
from tests.support.settings import make_settings, write_config
from tools.stack.services import RedisService, free_port

TOKEN_ENV = "MAMMO_TEST_MONITORING_TOKEN"
TOKEN = "t0ken-for-tests-only"


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None
         ) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def serve_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    port = free_port()
    settings = make_settings(tmp_path, listener=True, monitoring={
        "port": port, "worker_port": free_port(), "worker_port_count": 1, "token_env": TOKEN_ENV})
    server = start_node_monitoring(settings, Spool(settings.spool.dir).ensure())
    assert server is not None
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# --- settings -----------------------------------------------------------------------------------
def test_monitoring_is_off_unless_configured_and_loopback_by_default(tmp_path: Path) -> None:
    assert make_settings(tmp_path).monitoring is None
    section = make_settings(tmp_path, monitoring={}).monitoring
    assert section is not None and section.bind_address == "127.0.0.1"


@pytest.mark.parametrize("bad, key", [
    ({"port": 9466, "worker_port": 9465, "worker_port_count": 4}, "falls in the workers' range"),
    ({"token_env": "lower_case"}, "token_env"),
    ({"heartbeat_interval_s": 30, "worker_silent_after_s": 20}, "worker_silent_after_s"),
    ({"bind_address": "localhost"}, "bind_address"),
])
def test_bad_monitoring_settings_are_refused(tmp_path: Path, bad: dict[str, object], key: str
                                             ) -> None:
    with pytest.raises(ConfigError, match=key):
        make_settings(tmp_path, monitoring=bad)


def test_monitoring_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "conf" / "node.yaml",
                        monitoring={"tls": {"cert_file": "m.crt", "key_file": "m.key"}})
    section = load_settings(path).monitoring
    assert section is not None and section.tls is not None
    assert section.tls.cert_file == (tmp_path / "conf" / "m.crt").resolve()


# --- the endpoint -------------------------------------------------------------------------------
def test_every_path_wants_the_bearer_token(serve_endpoint: str) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert _get(serve_endpoint + path)[0] == 401
        assert _get(serve_endpoint + path, "wrong-token")[0] == 401
    assert _get(serve_endpoint + "/healthz", TOKEN) == (200, "ok\n")
    assert _get(serve_endpoint + "/nothing", TOKEN)[0] == 404


def test_garbage_and_vanishing_clients_leave_no_raw_text_on_stderr(
        serve_endpoint: str, capfd: pytest.CaptureFixture[str]) -> None:
    host, port = serve_endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(4096), b""))
        assert b"400" in answer  # http.server's "Bad request"
    for _ in range(3):  # ask and leave before the answer
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert _get(serve_endpoint + "/healthz", TOKEN) == (200, "ok\n")  # still serving
    assert "Traceback" not in capfd.readouterr().err


def test_readyz_says_what_is_missing(serve_endpoint: str) -> None:
    status, body = _get(serve_endpoint + "/readyz", TOKEN)
    report = json.loads(body)
    assert status == 503 and report["ready"] is False
    # The test broker URL points where nobody listens, no destination, no worker heartbeat.
    assert not report["checks"]["broker"]["ok"]
    assert not report["checks"]["destinations"]["ok"]
    assert not report["checks"]["workers"]["ok"]
    assert report["checks"]["spool_disk"]["ok"] and report["checks"]["spool_writable"]["ok"]


def test_metrics_carry_the_listener_counters_and_the_spool_state(serve_endpoint: str) -> None:
    metrics.INSTANCES_RECEIVED.labels(calling_ae="UNIT_TEST_AE").inc()
    status, text = _get(serve_endpoint + "/metrics", TOKEN)
    assert status == 200
    assert 'mammo_instances_received_total{calling_ae="UNIT_TEST_AE"}' in text
    for state in ("queued", "work", "done", "failed", "discarded"):
        assert f'mammo_runs{{state="{state}"}} 0.0' in text
    assert "mammo_broker_up 0.0" in text  # nobody listens on the test broker port


def test_an_unset_token_variable_stops_start_up_without_showing_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    settings = make_settings(tmp_path, monitoring={"port": free_port(), "token_env": TOKEN_ENV})
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        start_node_monitoring(settings, Spool(settings.spool.dir).ensure())


def test_tls_endpoint(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificate", pytrace=False)
    cert, key = tmp_path / "m.crt", tmp_path / "m.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    settings = make_settings(tmp_path, monitoring={
        "port": port, "worker_port": free_port(), "worker_port_count": 1,
        "tls": {"cert_file": str(cert), "key_file": str(key)}})
    server = start_node_monitoring(settings, Spool(settings.spool.dir).ensure())
    assert server is not None
    try:
        context = ssl.create_default_context(cafile=str(cert))
        assert _get(f"https://127.0.0.1:{port}/healthz", context=context) == (200, "ok\n")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _get(f"http://127.0.0.1:{port}/healthz")  # plain HTTP gets no answer
    finally:
        server.stop()


def test_a_worker_takes_the_next_free_port_of_its_range() -> None:
    first, second = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        server = MonitoringServer(REGISTRY, lambda: (True, {}), "127.0.0.1", (first, second))
        server.start()
        try:
            assert server.port == second
        finally:
            server.stop()
        with pytest.raises(OSError, match="no free port"):
            MonitoringServer(REGISTRY, lambda: (True, {}), "127.0.0.1", (first,)).start()


# --- the metric definitions ---------------------------------------------------------------------
def _value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_finished_run_is_counted_with_its_stages_sends_and_score() -> None:
    record = RunRecord(
        run_id="20260101T000000-unit", study_uid="1.2.3", state="failed",
        model=ModelRef(name="unit-model", version="9.9"),
        timings_s={"decode": 0.2, "inference": 1.5, "not_a_stage": 3.0},
        error=RunFailure(kind=FailureKind.SEND, message="pacs: 1 object(s) not stored"),
        scores=Scores(views={"R-CC": 0.7}, breasts={"R": 0.7}, exam=0.7, operating_point=0.5,
                      suspicious=True),
        sends=(SendResult(destination="unit-pacs", file="sr.dcm", sop_uid="1.2.4",
                          status="0x0000", ok=True),
               SendResult(destination="unit-pacs", file="seg.dcm", sop_uid="1.2.5",
                          status=None, ok=False),
               SendResult(destination="unit-pacs", file="cad.dcm", sop_uid="1.2.6",
                          status=None, ok=False, refused="no presentation context accepted for "
                          "Mammography CAD SR Storage in Explicit VR Little Endian")),
    )
    source = metrics.RunSource(calling_ae="UNIT_AE", manufacturer="Unit Vendor")
    score_labels = {"model": "unit-model", "model_version": "9.9", "calling_ae": "UNIT_AE",
                    "manufacturer": "Unit Vendor"}
    before_failed = _value("mammo_runs_finished_total", {"state": "failed", "error_kind": "send"})
    before_score = _value("mammo_exam_score_count", score_labels)
    before_verdicts = _value("mammo_exam_verdicts_total", {
        **score_labels, "operating_point": "balanced", "verdict": "suspicious"})
    metrics.observe_run(record, source)
    assert _value("mammo_runs_finished_total",
                  {"state": "failed", "error_kind": "send"}) == before_failed + 1
    assert _value("mammo_exam_score_count", score_labels) == before_score + 1
    assert _value("mammo_exam_score_bucket", {**score_labels, "le": "0.7"}) >= 1
    # the verdict at the configured point (the record says which: "balanced" by default)
    verdict_labels = {**score_labels, "operating_point": "balanced", "verdict": "suspicious"}
    assert _value("mammo_exam_verdicts_total", verdict_labels) == before_verdicts + 1
    below = record.model_copy(update={"scores": record.scores.model_copy(update={
        "exam": 0.2, "suspicious": False, "operating_point_name": "high_sensitivity"})})
    metrics.observe_run(below, source)
    assert _value("mammo_exam_verdicts_total", {**score_labels, "verdict": "not_suspicious",
                                                "operating_point": "high_sensitivity"}) >= 1
    assert _value("mammo_sends_total", {"destination": "unit-pacs", "outcome": "failed"}) >= 1
    assert _value("mammo_sends_total", {"destination": "unit-pacs", "outcome": "refused"}) >= 1
    assert _value("mammo_stage_duration_seconds_count", {"stage": "inference"}) >= 1
    assert REGISTRY.get_sample_value("mammo_stage_duration_seconds_count",
                                     {"stage": "not_a_stage"}) is None


def test_an_object_stored_by_an_earlier_attempt_is_not_counted_again() -> None:
    """After `runs retry`, the objects the first attempt stored are in the record with
    `earlier` (not sent again): they were counted when they were stored."""
    record = RunRecord(
        run_id="20260101T000001-unit", study_uid="1.2.3", state="done",
        model=ModelRef(name="unit-model", version="9.9"),
        sends=(SendResult(destination="unit-retried", file="sr.dcm", sop_uid="1.2.4",
                          status="0x0000", ok=True, earlier=True),
               SendResult(destination="unit-retried", file="seg.dcm", sop_uid="1.2.5",
                          status="0x0000", ok=True)))
    labels = {"destination": "unit-retried", "outcome": "stored"}
    before = _value("mammo_sends_total", labels)
    metrics.observe_run(record, metrics.RunSource(calling_ae="UNIT_AE", manufacturer=""))
    assert _value("mammo_sends_total", labels) == before + 1
    assert "earlier" not in record.sends[1].model_dump_json()  # absent unless true


def test_label_values_from_received_data_are_cleaned_and_capped() -> None:
    assert metrics.clean_label("ACME\x00\n Medical" + "x" * 100) == ("ACME Medical" + "x" * 100)[:64]
    labels = {metrics._manufacturer_label(f"vendor-{n}") for n in range(metrics.MAX_MANUFACTURERS * 2)}
    assert "other" in labels and len(labels) <= metrics.MAX_MANUFACTURERS + 1


def test_exported_names_cover_counters_histograms_and_state() -> None:
    names = metrics.exported_names()
    assert {"mammo_instances_received_total", "mammo_exam_score_bucket", "mammo_exam_score_sum",
            "mammo_exam_verdicts_total",
            "mammo_runs", "mammo_worker_last_seen_age_seconds",
            "mammo_stage_duration_seconds_count"} <= names


# --- heartbeats on a real Redis -------------------------------------------------------------------
def test_heartbeats_round_trip_and_a_clean_stop_removes_its_own(
        tmp_path: Path, redis_service: RedisService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAMMO_BROKER_PASSWORD", redis_service.password)
    settings = make_settings(tmp_path, broker={"url": f"redis://127.0.0.1:{redis_service.port}/0"},
                             destinations=[{"name": "pacs", "ae_title": "PACS",
                                            "host": "127.0.0.1", "port": 104}])
    spool = Spool(settings.spool.dir).ensure()
    folder = tmp_path / "pool-metrics"
    folder.mkdir()
    monitor = WorkerMonitor(settings, folder)
    beat = monitor.beat_once()  # no pool process yet: known, but not ready
    assert read_heartbeats(settings) == [beat] and beat.ready == 0 and beat.model == ""
    snapshot = take_snapshot(settings, spool)
    assert snapshot.queue_depth == 0 and snapshot.broker_error is None
    assert [name for name, check in snapshot.checks().items() if not check.ok] == ["workers"]

    dead = WorkerBeat(worker="gone:1", host="gone", pid=1, model="m", model_version="1", ready=1,
                      port=None, at=time.time() - 2 * 86400)
    publish_heartbeat(settings, dead)
    assert dead in read_heartbeats(settings)
    assert dead not in read_heartbeats(settings, forget_before=time.time() - 86400)
    assert read_heartbeats(settings) == [beat]  # forgotten for good

    monitor.stop()
    assert read_heartbeats(settings) == [] and not folder.exists()


# --- the worker: prefork children report through multiprocess files -----------------------------
_POOL_SCRIPT = textwrap.dedent("""
    import json, multiprocessing, os, sys
    from node.monitoring import WorkerMonitor, prepare_worker_metrics_dir
    from tests.support.settings import make_settings
    from pathlib import Path

    folder = prepare_worker_metrics_dir()          # before prometheus_client is imported
    from node import metrics

    def child(go, done):
        metrics.MODEL_LOADED.labels(model="m", model_version="1").set(1)
        metrics.RUNS_FINISHED.labels(state="done", error_kind="").inc()
        done.set()
        go.wait(30)

    ctx = multiprocessing.get_context("fork")     # as Celery's prefork pool does
    go = ctx.Event()
    pool = []
    for _ in range(2):
        done = ctx.Event()
        p = ctx.Process(target=child, args=(go, done)); p.start(); done.wait(30); pool.append(p)
    monitor = WorkerMonitor(make_settings(Path(sys.argv[1])), folder)
    while_alive = monitor.model_state()
    go.set()
    for p in pool:
        p.join(30)
    after_exit = monitor.model_state()               # killed or ended: no longer counted
    runs = monitor.registry.get_sample_value("mammo_runs_finished_total",
                                             {"state": "done", "error_kind": ""})
    print(json.dumps({"alive": while_alive, "after": after_exit, "runs": runs}))
""")


def test_pool_children_metrics_are_summed_by_the_worker_parent(tmp_path: Path) -> None:
    # The folder of a worker killed with SIGKILL (no such pid): the next worker removes it.
    # The child's temporary folder is its own (this process's may have been redirected by an
    # in-process listener of another test: the receiver sets it to the spool's tmp/).
    child_tmp = tmp_path / "tmp"
    child_tmp.mkdir()
    stale = child_tmp / "mammo-worker-metrics-999999999-unit"
    stale.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "TMPDIR": str(child_tmp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["alive"] == ["m", "1", 2]
    assert report["after"] == ["", "", 0]
    assert report["runs"] == 2.0  # counters of ended children are kept
    assert not stale.exists()


def test_the_metrics_folder_must_come_before_prometheus_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from node.monitoring import prepare_worker_metrics_dir

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert "prometheus_client" in sys.modules  # imported by this module
    with pytest.raises(RuntimeError, match="imported before"):
        prepare_worker_metrics_dir()


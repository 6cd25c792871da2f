"""Health, readiness and metrics over HTTP, for `serve` and for each worker; worker heartbeats.

- `MonitoringServer`: `/healthz` (the process answers), `/readyz` (JSON, 200 or 503) and
  `/metrics` (Prometheus text). Loopback by default; a bearer token (from the environment
  variable `monitoring.token_env` names) guards every path when configured; TLS optional.
- `serve` (`start_node_monitoring`): the default registry (the listener's counters, the process
  collector) plus `NodeStateCollector`, which reads at scrape time what the spool and Redis say
  (`node.metrics.STATE_GAUGES`). Ready when the broker answers, the spool is above its watermark
  and writable, destinations are configured and a worker with its model loaded sent a heartbeat
  within `monitoring.worker_silent_after_s`.
- A worker (`WorkerMonitor`, in the Celery parent process): its pool children write their
  metrics into prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, one fresh
  folder per worker, set by `prepare_worker_metrics_dir` before prometheus_client is imported);
  the parent serves their sum and publishes a heartbeat to Redis every
  `monitoring.heartbeat_interval_s` with the model its children loaded. Ready when a child has
  the model loaded and the broker answers.
- `take_snapshot`: the node's state in one typed value, shared by the collector, `/readyz` and
  `mammo-node status`.

Heartbeats live in one Redis hash per queue (`mammo-node:workers:<queue>`), one field per worker
(JSON: host, pid, model, version, ready processes, metrics port, time). A worker that stops
cleanly removes its field; one that dies leaves it ageing, which is what the silent-worker alert
watches. Nothing here is PHI.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from node.errors import ConfigError, TransientError
from node.logs import get_logger
from node.queueing import broker_client, queue_depth
from node.settings import MonitoringSection, Settings
from node.spool import RUN_STATES, Spool, free_bytes

log = get_logger("node.monitoring")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_FORGET_S = 86400.0  # a heartbeat older than a day is dropped from the hash by serve
DEFAULT_MONITORING = MonitoringSection()  # intervals used when the config has no section
_HANDSHAKE_TIMEOUT_S = 10.0


# --- heartbeats ---------------------------------------------------------------------------------
def heartbeat_key(settings: Settings) -> str:
    return f"mammo-node:workers:{settings.broker.queue}"


@dataclass(frozen=True)
class WorkerBeat:
    """One worker's last heartbeat."""

    worker: str  # "<host>:<pid>" of the Celery parent process
    host: str
    pid: int
    model: str  # "" until a pool process has loaded the bundle
    model_version: str
    ready: int  # pool processes with the model loaded
    port: int | None  # its monitoring endpoint, when it has one
    at: float  # wall clock of the beat

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.at)


def publish_heartbeat(settings: Settings, beat: WorkerBeat) -> None:
    """Write the beat (TransientError when the broker is away)."""
    try:
        client = broker_client(settings)
        try:
            client.hset(heartbeat_key(settings), beat.worker, json.dumps(asdict(beat)))
        finally:
            client.close()
    except Exception as error:  # redis raises many types for one cause: the broker is away
        raise TransientError(f"broker unavailable: {type(error).__name__}") from error


def remove_heartbeat(settings: Settings, worker: str) -> None:
    """A worker that stops cleanly is not a silent worker: its field goes (best effort)."""
    try:
        client = broker_client(settings)
        try:
            client.hdel(heartbeat_key(settings), worker)
        finally:
            client.close()
    except Exception as error:
        log.warning("heartbeat_remove_failed", reason=type(error).__name__)


def read_heartbeats(settings: Settings, forget_before: float | None = None) -> list[WorkerBeat]:
    """Every worker's last beat, oldest first; beats older than `forget_before` are deleted."""
    try:
        client = broker_client(settings)
        try:
            raw: dict[Any, Any] = client.hgetall(heartbeat_key(settings))
            beats, stale = [], []
            for name, value in raw.items():
                try:
                    beat = WorkerBeat(**json.loads(value))
                except (ValueError, TypeError):
                    stale.append(name)
                    continue
                if forget_before is not None and beat.at < forget_before:
                    stale.append(name)
                else:
                    beats.append(beat)
            if stale:
                client.hdel(heartbeat_key(settings), *stale)
        finally:
            client.close()
    except Exception as error:
        raise TransientError(f"broker unavailable: {type(error).__name__}") from error
    return sorted(beats, key=lambda b: b.at)


# --- the node's state -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class NodeSnapshot:
    """What `serve`'s metrics, `/readyz` and `mammo-node status` report, read once."""

    taken_at: float
    runs: Mapping[str, int]
    incoming_studies: int
    queue_depth: int | None  # None when the broker did not answer
    broker_error: str | None
    workers: tuple[WorkerBeat, ...]
    free_bytes: int
    min_free_bytes: int
    spool_writable: bool
    destinations: int
    silent_after_s: float

    def live_workers(self) -> list[WorkerBeat]:
        """Workers heard from within the silence limit with a model loaded."""
        return [w for w in self.workers
                if w.age_s(self.taken_at) < self.silent_after_s and w.ready > 0]

    def checks(self) -> dict[str, Check]:
        live = self.live_workers()
        return {
            "broker": Check(self.broker_error is None, self.broker_error or "answers"),
            "spool_disk": Check(self.free_bytes >= self.min_free_bytes,
                                f"{self.free_bytes} bytes free, watermark {self.min_free_bytes}"),
            "spool_writable": Check(self.spool_writable,
                                    "writable" if self.spool_writable else "cannot create a file"),
            "destinations": Check(self.destinations > 0, f"{self.destinations} configured"),
            "workers": Check(bool(live), f"{len(live)} alive with a model of "
                                         f"{len(self.workers)} known"),
        }

    def problems(self) -> list[str]:
        return [f"{name}: {check.detail}" for name, check in self.checks().items() if not check.ok]

    def as_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "ready": not self.problems(),
            "checks": {name: asdict(check) for name, check in self.checks().items()},
            "runs": dict(self.runs),
            "incoming_studies": self.incoming_studies,
            "queue_depth": self.queue_depth,
            "workers": [{**asdict(w), "age_s": round(w.age_s(self.taken_at), 1),
                         "alive": w in self.live_workers()} for w in self.workers],
            "spool": {"free_bytes": self.free_bytes, "min_free_bytes": self.min_free_bytes,
                      "writable": self.spool_writable},
            "destinations": self.destinations,
        }


def spool_writable(spool: Spool) -> bool:
    """Can a file be created (and removed) in the spool's tmp/ right now?"""
    try:
        with tempfile.NamedTemporaryFile(dir=spool.tmp_dir, prefix=".probe-"):
            return True
    except OSError:
        return False


def take_snapshot(settings: Settings, spool: Spool, forget_heartbeats: bool = False
                  ) -> NodeSnapshot:
    """Read the spool, the broker queue and the heartbeats (never raises for an absent broker)."""
    now = time.time()
    runs: dict[str, int] = {state: len(spool.runs(state)) for state in RUN_STATES}
    incoming = spool.incoming_dir
    incoming_studies = sum(1 for p in incoming.iterdir() if p.is_dir()) if incoming.is_dir() else 0
    depth: int | None = None
    broker_error: str | None = None
    workers: list[WorkerBeat] = []
    try:
        depth = queue_depth(settings)
        workers = read_heartbeats(settings, now - HEARTBEAT_FORGET_S if forget_heartbeats else None)
    except TransientError as error:
        broker_error = str(error)
    monitoring = settings.monitoring or DEFAULT_MONITORING
    return NodeSnapshot(
        taken_at=now, runs=runs, incoming_studies=incoming_studies, queue_depth=depth,
        broker_error=broker_error, workers=tuple(workers), free_bytes=free_bytes(spool.root),
        min_free_bytes=settings.spool.min_free_bytes, spool_writable=spool_writable(spool),
        destinations=len(settings.destinations),
        silent_after_s=monitoring.worker_silent_after_s,
    )


class NodeStateCollector:
    """`serve`'s state gauges (node.metrics.STATE_GAUGES), read at each scrape."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool

    def describe(self) -> Iterable[Any]:
        return self._families(None)

    def collect(self) -> Iterable[Any]:
        return self._families(take_snapshot(self.settings, self.spool, forget_heartbeats=True))

    def _families(self, snapshot: NodeSnapshot | None) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from node.metrics import STATE_GAUGES

        families = {name: GaugeMetricFamily(name, text, labels=list(labels))
                    for name, (text, labels) in STATE_GAUGES.items()}
        if snapshot is None:
            return list(families.values())
        for state, count in snapshot.runs.items():
            families["mammo_runs"].add_metric([state], count)
        families["mammo_incoming_studies"].add_metric([], snapshot.incoming_studies)
        if snapshot.queue_depth is not None:
            families["mammo_queue_depth"].add_metric([], snapshot.queue_depth)
        families["mammo_broker_up"].add_metric([], 0 if snapshot.broker_error else 1)
        families["mammo_spool_free_bytes"].add_metric([], snapshot.free_bytes)
        families["mammo_spool_min_free_bytes"].add_metric([], snapshot.min_free_bytes)
        families["mammo_spool_writable"].add_metric([], 1 if snapshot.spool_writable else 0)
        families["mammo_destinations"].add_metric([], snapshot.destinations)
        for beat in snapshot.workers:
            labels = [beat.worker, beat.model, beat.model_version]
            families["mammo_worker_last_seen_age_seconds"].add_metric(
                labels, round(beat.age_s(snapshot.taken_at), 3))
            families["mammo_worker_ready_processes"].add_metric(labels, beat.ready)
        return list(families.values())


# --- the HTTP endpoint ----------------------------------------------------------------------------
Readiness = Callable[[], tuple[bool, dict[str, Any]]]


def monitoring_token(section: MonitoringSection) -> str | None:
    """The bearer token from the environment; ConfigError when the config names an unset one."""
    if section.token_env is None:
        return None
    token = os.environ.get(section.token_env, "")
    if not token:
        raise ConfigError(f"monitoring.token_env: environment variable {section.token_env} is "
                          "not set (the endpoint would be open)")
    return token


class _Handler(BaseHTTPRequestHandler):
    server: _EndpointServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        endpoint = self.server.endpoint
        if not endpoint.authorised(self.headers.get("Authorization", "")):
            endpoint.note_refused(self.client_address[0])
            self._reply(401, b"unauthorised\n", "text/plain; charset=utf-8",
                        {"WWW-Authenticate": "Bearer"})
            return
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            try:
                ready, detail = endpoint.readiness()
            except Exception as error:  # a readiness probe that crashes is a "not ready"
                ready, detail = False, {"error": type(error).__name__}
            body = json.dumps({"ready": ready, **detail}, sort_keys=True).encode()
            self._reply(200 if ready else 503, body + b"\n", "application/json")
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._reply(200, generate_latest(endpoint.registry), CONTENT_TYPE_LATEST)
        else:
            self._reply(404, b"not found\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str,
               headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # no access log: scrapes every few seconds would drown the node's log


class _EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: MonitoringServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake here, on the request's own thread, so a slow client blocks no one."""
        context = self.endpoint.ssl_context
        if context is not None:
            try:
                request.settimeout(_HANDSHAKE_TIMEOUT_S)
                request = context.wrap_socket(request, server_side=True)
            except (OSError, ValueError):
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One JSON log line, not socketserver's traceback on stderr (a client that went away)."""
        error = sys.exc_info()[1]
        log.warning("monitoring_request_failed", endpoint=self.endpoint.name,
                    reason=type(error).__name__ if error else "unknown")


@dataclass
class MonitoringServer:
    """One HTTP endpoint; `start()` binds the first free port of `ports` and serves in a thread."""

    registry: Any
    readiness: Readiness
    bind_address: str
    ports: tuple[int, ...]
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    name: str = "monitoring"
    _server: _EndpointServer | None = field(default=None, init=False)
    _refusals_logged: int = field(default=0, init=False)

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def authorised(self, header: str) -> bool:
        if self.token is None:
            return True
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                  self.token.encode())

    def note_refused(self, host: str) -> None:
        if self._refusals_logged < 100:  # a scraper with a stale token must not flood the log
            self._refusals_logged += 1
            log.warning("monitoring_request_refused", endpoint=self.name, host=host,
                        reason="missing_or_wrong_bearer_token")

    def start(self) -> tuple[str, int]:
        last_error: OSError | None = None
        for port in self.ports:
            try:
                server = _EndpointServer((self.bind_address, port), _Handler)
            except OSError as error:
                last_error = error
                continue
            server.endpoint = self
            self._server = server
            threading.Thread(target=server.serve_forever, name=f"{self.name}-http",
                             daemon=True).start()
            log.info("monitoring_started", endpoint=self.name, host=self.bind_address, port=port,
                     tls=self.ssl_context is not None, token=self.token is not None)
            return self.bind_address, port
        first, last = self.ports[0], self.ports[-1]
        raise OSError(getattr(last_error, "errno", None),
                      f"monitoring.{self.name}: no free port in {first}-{last} on "
                      f"{self.bind_address} ({getattr(last_error, 'strerror', last_error)})")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _ssl_context(section: MonitoringSection) -> ssl.SSLContext | None:
    if section.tls is None:
        return None
    from node.tls import server_context

    return server_context(section.tls, "monitoring.tls")


# --- serve ----------------------------------------------------------------------------------------
class _Together:
    """What `generate_latest` needs of a registry (`collect`), over several collectors."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Any]:
        for collector in self.collectors:
            yield from collector.collect()


def start_node_monitoring(settings: Settings, spool: Spool) -> MonitoringServer | None:
    """`serve`'s endpoint, when `monitoring` is configured (ConfigError, OSError stop start-up):
    the default registry (listener counters, process metrics) and the state read at scrape."""
    section = settings.monitoring
    if section is None:
        return None
    from prometheus_client import REGISTRY

    def readiness() -> tuple[bool, dict[str, Any]]:
        detail = take_snapshot(settings, spool).as_json()
        return bool(detail.pop("ready")), detail

    from node.drift import DriftCollector, DriftStore

    # the score drift per source, computed from the worker's rolling store at each scrape
    drift = DriftCollector(DriftStore(spool.root, settings.drift.window, settings.drift.max_sources))
    server = MonitoringServer(_Together(REGISTRY, NodeStateCollector(settings, spool), drift),
                              readiness, section.bind_address, (section.port,),
                              monitoring_token(section), _ssl_context(section), name="serve")
    server.start()
    return server


# --- the worker -----------------------------------------------------------------------------------
def prepare_worker_metrics_dir() -> Path:
    """A fresh multiprocess folder for this worker, in the environment before prometheus_client
    is imported (its value class is chosen at import: imported earlier, the pool children would
    keep their counts to themselves and the endpoint would show zeros)."""
    if "prometheus_client" in sys.modules and MULTIPROC_ENV not in os.environ:
        raise RuntimeError("prometheus_client was imported before the worker's metrics folder "
                           "was set; the pool's metrics would be lost")
    _remove_folders_of_dead_workers()
    folder = Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


_FOLDER_PREFIX = "mammo-worker-metrics-"


def _remove_folders_of_dead_workers() -> None:
    """A worker killed with SIGKILL leaves its folder behind: the next one removes it."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_FOLDER_PREFIX}*-*"):
        try:
            pid = int(folder.name.removeprefix(_FOLDER_PREFIX).split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue


def forget_process(pid: int) -> None:
    """A pool process ends: its live gauges (model loaded) stop counting."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            pass  # forgotten at the same moment by the other thread (scrape vs heartbeat)


def _dead_pids(folder: Path) -> Iterator[int]:
    for path in folder.glob("gauge_live*_*.db"):
        try:
            pid = int(path.stem.rsplit("_", 1)[1])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            yield pid
        except PermissionError:
            continue


class WorkerMonitor:
    """The Celery parent's endpoint and heartbeat (start before `worker_main`, stop after)."""

    def __init__(self, settings: Settings, metrics_dir: Path) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.settings = settings
        self.section = settings.monitoring or DEFAULT_MONITORING
        self.metrics_dir = metrics_dir
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.registry = CollectorRegistry()
        self._collector = MultiProcessCollector(  # type: ignore[no-untyped-call]
            self.registry, str(metrics_dir))
        self.server: MonitoringServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down_logged = False

    def model_state(self) -> tuple[str, str, int]:
        """(model, version, processes with it loaded), from the pool's multiprocess files."""
        for pid in _dead_pids(self.metrics_dir):  # a pool process killed without a goodbye
            forget_process(pid)
        model, version, ready = "", "", 0
        for family in self._collector.collect():  # type: ignore[no-untyped-call]
            if family.name != "mammo_worker_model_loaded":
                continue
            for sample in family.samples:
                if sample.value > 0:
                    model = sample.labels.get("model", "")
                    version = sample.labels.get("model_version", "")
                    ready += int(sample.value)
        return model, version, ready

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        model, version, ready = self.model_state()
        try:
            client = broker_client(self.settings)
            try:
                broker_ok = bool(client.ping())
            finally:
                client.close()
            broker = "answers"
        except Exception as error:
            broker_ok, broker = False, f"broker unavailable: {type(error).__name__}"
        checks = {"model": {"ok": ready > 0, "detail": f"{model} {version}, {ready} process(es)"
                            if ready else "no pool process has loaded the model yet"},
                  "broker": {"ok": broker_ok, "detail": broker}}
        return ready > 0 and broker_ok, {"worker": self.worker, "checks": checks}

    def start(self) -> None:
        if self.settings.monitoring is not None:
            section = self.settings.monitoring
            ports = tuple(range(section.worker_port, section.worker_port + section.worker_port_count))
            self.server = MonitoringServer(self.registry, self.readiness, section.bind_address,
                                           ports, monitoring_token(section), _ssl_context(section),
                                           name="worker")
            self.server.start()
        self._thread = threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def beat_once(self) -> WorkerBeat:
        model, version, ready = self.model_state()
        beat = WorkerBeat(worker=self.worker, host=socket.gethostname(), pid=os.getpid(),
                          model=model, model_version=version, ready=ready,
                          port=self.server.port if self.server else None, at=time.time())
        publish_heartbeat(self.settings, beat)
        return beat

    def _beat(self) -> None:
        while True:
            try:
                self.beat_once()
                if self._broker_down_logged:
                    log.info("heartbeat_resumed", worker=self.worker)
                self._broker_down_logged = False
            except TransientError as error:
                if not self._broker_down_logged:
                    log.warning("heartbeat_failed", worker=self.worker, reason=str(error))
                    self._broker_down_logged = True
            except Exception as error:  # the heartbeat must outlive any one bad beat
                log.warning("heartbeat_failed", worker=self.worker, reason=type(error).__name__)
            if self._stop.wait(self.section.heartbeat_interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        remove_heartbeat(self.settings, self.worker)
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

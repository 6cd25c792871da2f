"""Start and stop the local services that tests, the demo and the benchmarks need.

Standard library only, so it works from any Python (no pytest, no redis-py):

- ``RedisService``: a private ``redis-server`` on 127.0.0.1, a free port and a password.
- ``OrthancService``: ``/usr/sbin/Orthanc`` (Debian 1.10.1) as the PACS, with a generated
  JSON config, free DICOM and HTTP ports and small REST helpers.

Each service writes its stdout/stderr to a log file in its own directory; a start that fails
raises ``ServiceError`` with the tail of that log. Services started here are tracked in
``running_services()`` and stopped by ``stop_all()`` (also registered with ``atexit``).
With ``die_with_parent=True`` (the default) the child gets SIGTERM when the thread that
started it exits (``setpriv --pdeathsig``), so a killed test run leaves no service behind;
start services from the main thread, or pass ``die_with_parent=False``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "OrthancError",
    "OrthancService",
    "RedisService",
    "ServiceError",
    "find_binary",
    "find_dicomweb_plugin",
    "free_port",
    "exit_on_termination_signals",
    "running_services",
    "stop_all",
]

STOP_GRACE_S = 10.0
# Orthanc's DICOMweb plugin (Debian `orthanc-dicomweb`), served under this root of the REST port
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN_NAME = "libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"
LOG_TAIL_BYTES = 4000

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()
_running: list[_Service] = []
_running_lock = threading.Lock()


class ServiceError(RuntimeError):
    """A service binary is missing, or a service did not start or stop."""


class OrthancError(RuntimeError):
    """Orthanc's REST API answered with an HTTP error."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


def free_port() -> int:
    """A TCP port that is free on every interface right now (never the same one twice here)."""
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise ServiceError("no free TCP port found")


def find_binary(name: str, *extra_dirs: str) -> str:
    """Absolute path of a service binary, looking in PATH and then in ``extra_dirs``."""
    found = shutil.which(name)
    if found:
        return found
    for directory in (*extra_dirs, "/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        f"{name} not found: install the Debian packages with `make install` "
        "(tools/install.sh; orthanc, dcmtk, dicom3tools, redis-server)"
    )


def find_dicomweb_plugin() -> Path:
    """Path of Orthanc's DICOMweb plugin library, from the Debian package `orthanc-dicomweb`."""
    for directory in DICOMWEB_PLUGIN_DIRS:
        candidate = Path(directory) / DICOMWEB_PLUGIN_NAME
        if candidate.is_file():
            return candidate
    raise ServiceError(
        f"{DICOMWEB_PLUGIN_NAME} not found in {', '.join(DICOMWEB_PLUGIN_DIRS)}: install the "
        "Debian package orthanc-dicomweb with `make install` (tools/install.sh)"
    )


def running_services() -> list[_Service]:
    """Services started by this process and not stopped yet."""
    with _running_lock:
        return [svc for svc in _running if svc.running]


def stop_all() -> None:
    """Stop every service this process started (newest first)."""
    for svc in reversed(running_services()):
        with contextlib.suppress(Exception):
            svc.stop()


atexit.register(stop_all)


def exit_on_termination_signals() -> None:
    """SIGTERM and SIGHUP become `SystemExit` in the main thread, as SIGINT is KeyboardInterrupt.

    Python's default for SIGTERM ends the process at once: no `finally`, no atexit, so whatever
    it started keeps running. With this, `kill PID` unwinds like Ctrl-C does, and the `finally`
    blocks and atexit handlers stop the services. A second signal of any of the three while
    stopping (Ctrl-C pressed twice) is ignored, so it cannot cut the stop short or end it in a
    traceback (children still die with their parent, see `die_with_parent`).
    """
    signals = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def leave(signum: int, _frame: object) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    # Python leaves SIGINT ignored when it started ignored (a job started with `&` by a script):
    # Ctrl-C or `kill -INT` must still stop everything, so it is set here too.
    for sig in signals:
        signal.signal(sig, leave)


def _log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-limit:].decode("utf-8", "replace")


class _Service:
    """A child process with a log file in its own directory."""

    name = "service"
    start_timeout_s = 30.0

    def __init__(self, directory: str | os.PathLike[str], *, die_with_parent: bool = True):
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / f"{self.name}.log"
        self.die_with_parent = die_with_parent
        self.persist = False  # set by a module/session fixture that owns the service
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to be provided by subclasses -------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _new_ports(self) -> bool:
        """Pick new ports after a failed start; False when the ports were given explicitly."""
        return False

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        return _log_tail(self.log_path, limit)

    def start(self, timeout_s: float | None = None):
        """Start the process and wait until it answers; retries on new ports if it dies early."""
        if self.running:
            return self
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        attempts = 3
        for attempt in range(1, attempts + 1):
            self._spawn()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if self._is_ready():
                    with _running_lock:
                        if self not in _running:
                            _running.append(self)
                    return self
                time.sleep(0.05)
            else:
                self._terminate()
                raise ServiceError(
                    f"{self.name} did not answer within {timeout_s:.0f} s "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            # died during start: most often a port taken between free_port() and bind()
            if attempt < attempts and self._new_ports():
                continue
            raise ServiceError(
                f"{self.name} exited with status {self._proc.returncode} during start "
                f"({self.log_path}):\n{self.log_tail()}"
            )
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        command = self._command()
        if self.die_with_parent:
            setpriv = shutil.which("setpriv")
            if setpriv:
                command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {command}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(  # noqa: S603
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Returns the exit status."""
        self._terminate(grace_s)
        with _running_lock:
            if self in _running:
                _running.remove(self)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL at once (for fault tests): no clean shutdown."""
        if self.running:
            self._proc.kill()
            self._proc.wait()
        with _running_lock:
            if self in _running:
                _running.remove(self)

    def restart(self, timeout_s: float | None = None):
        """Stop and start again on the same ports, password and directory."""
        self.stop()
        return self.start(timeout_s)

    def _terminate(self, grace_s: float = STOP_GRACE_S) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisService(_Service):
    """A private redis-server on 127.0.0.1 with a password and no RDB snapshots."""

    name = "redis"
    start_timeout_s = 20.0

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        password: str | None = None,
        port: int | None = None,
        appendonly: bool = False,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(directory, die_with_parent=die_with_parent)
        self.binary = find_binary("redis-server")
        self.password = password if password is not None else secrets.token_hex(16)
        self.host = "127.0.0.1"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` — the Celery broker URL."""
        return f"redis://:{urllib.parse.quote(self.password, safe='')}@{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--requirepass", self.password,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
        ]  # fmt: skip

    def _new_ports(self) -> bool:
        if self._fixed_port:
            return False
        self.port = free_port()
        return True

    def _is_ready(self) -> bool:
        try:
            return self.ping() == "+PONG"
        except OSError:
            return False

    def ping(self, password: str | None = None, timeout_s: float = 2.0) -> str:
        """Send (AUTH and) PING over RESP; returns the last reply line, e.g. ``+PONG``.

        ``password=None`` uses the service's password; ``password=""`` sends no AUTH.
        """
        password = self.password if password is None else password
        commands = [["AUTH", password]] if password else []
        commands.append(["PING"])
        payload = b"".join(_resp_command(args) for args in commands)
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
            sock.sendall(payload)
            replies: list[str] = []
            buffer = b""
            while len(replies) < len(commands):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\r\n")
                replies.extend(line.decode("utf-8", "replace") for line in lines)
        return replies[-1] if replies else ""


def _resp_command(args: Iterable[str]) -> bytes:
    parts = [a.encode() for a in args]
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        out.append(f"${len(part)}\r\n".encode() + part + b"\r\n")
    return b"".join(out)


ModalityEntry = list[Any] | tuple[Any, ...] | Mapping[str, Any]


class OrthancService(_Service):
    """Orthanc (Debian 1.10.1) as the PACS, with its storage and config in ``directory``.

    ``modalities`` maps a name to ``[AET, host, port]`` (or Orthanc's object form) so Orthanc
    can push to the node (``store_to_modality``) and accepts C-STORE from it: by default
    (``always_allow_store=False``) only listed modalities may store, like a real PACS, and
    the called AE title must be ``ae_title`` (``check_called_aet=True``). C-ECHO is open.
    Orthanc has no bind option: its ports listen on all interfaces; HTTP answers localhost
    only (``RemoteAccessAllowed: false``). ``dicomweb=True`` loads the DICOMweb plugin (Debian
    ``orthanc-dicomweb``) under ``dicomweb_url``, with full study and series metadata, which
    OHIF needs (tools/stack/viewer.py).
    """

    name = "orthanc"
    start_timeout_s = 30.0

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, ModalityEntry] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        always_allow_store: bool = False,
        check_called_aet: bool = True,
        max_pdu_bytes: int = 131072,
        stable_age_s: int = 2,
        dicom_scu_timeout_s: int = 30,
        extra_config: Mapping[str, Any] | None = None,
        dicomweb: bool = False,
        verbose: bool = False,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(directory, die_with_parent=die_with_parent)
        if not 4096 <= max_pdu_bytes <= 131072:
            raise ValueError(f"max_pdu_bytes={max_pdu_bytes}: Orthanc accepts 4096..131072")
        if len(ae_title) > 16:
            raise ValueError(f"ae_title={ae_title!r}: longer than 16 characters")
        self.binary = find_binary("Orthanc")
        self.ae_title = ae_title
        self.modalities = {name: _modality(entry) for name, entry in (modalities or {}).items()}
        self._fixed_ports = dicom_port is not None or http_port is not None
        self.dicom_port = dicom_port if dicom_port is not None else free_port()
        self.http_port = http_port if http_port is not None else free_port()
        self.always_allow_store = always_allow_store
        self.check_called_aet = check_called_aet
        self.max_pdu_bytes = max_pdu_bytes
        self.stable_age_s = stable_age_s
        self.dicom_scu_timeout_s = dicom_scu_timeout_s
        self.extra_config = dict(extra_config or {})
        self.dicomweb_plugin = find_dicomweb_plugin() if dicomweb else None
        self.verbose = verbose
        self.storage_dir = self.directory / "storage"
        self.config_path = self.directory / "orthanc.json"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS) of the plugin, without the final slash."""
        if self.dicomweb_plugin is None:
            raise ServiceError("Orthanc was configured without its DICOMweb plugin (dicomweb=False)")
        return self.rest_url + DICOMWEB_ROOT.rstrip("/")

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        config: dict[str, Any] = {
            "Name": f"mammo-node test PACS {self.ae_title}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 10,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": self.always_allow_store,
            "DicomCheckModalityHost": False,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": self.dicom_scu_timeout_s,
            "DicomScpTimeout": 30,
            # close outgoing associations at once, so stop() and PACS-outage tests are prompt
            "DicomAssociationCloseDelay": 0,
            "MaximumPduLength": self.max_pdu_bytes,
            "UnknownSopClassAccepted": False,
            "StableAge": self.stable_age_s,
            "SaveJobs": False,
            "OverwriteInstances": False,
            "ExecuteLuaEnabled": False,
            "DeidentifyLogs": True,
        }
        if self.dicomweb_plugin is not None:
            config["Plugins"] = [str(self.dicomweb_plugin)]
            # OHIF reads the whole study's metadata through QIDO/WADO-RS: "Full" answers from
            # the stored files, so every attribute a viewer needs is there (not only the
            # main DICOM tags Orthanc indexes).
            config["DicomWeb"] = {
                "Enable": True,
                "Root": DICOMWEB_ROOT,
                "EnableWado": True,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        config.update(self.extra_config)
        return config

    def _write_config(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")

    def _command(self) -> list[str]:
        self._write_config()
        command = [self.binary]
        if self.verbose:
            command.append("--verbose")
        command.append(str(self.config_path))
        return command

    def _new_ports(self) -> bool:
        if self._fixed_ports:
            return False
        self.dicom_port = free_port()
        self.http_port = free_port()
        return True

    def _is_ready(self) -> bool:
        try:
            system = self.get_json("/system", timeout_s=2)
        except (OSError, OrthancError, ValueError):
            return False
        # Orthanc starts its DICOM server before its HTTP server: /system answering means both
        return system.get("DicomPort") == self.dicom_port

    # -- REST ---------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float = 60,
    ) -> bytes:
        url = self.rest_url + path
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with self._opener.open(req, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            raise OrthancError(method, url, err.code, detail) from None

    def get_json(self, path: str, timeout_s: float = 60) -> Any:
        return json.loads(self.request("GET", path, timeout_s=timeout_s))

    def post_json(self, path: str, payload: Any, timeout_s: float = 60) -> Any:
        body = json.dumps(payload).encode()
        answer = self.request("POST", path, body, "application/json", timeout_s=timeout_s)
        return json.loads(answer) if answer.strip() else None

    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return self.get_json("/instances")

    def get_instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str, simplify: bool = True) -> dict[str, Any]:
        """Tags of one instance: ``{"SOPClassUID": ...}`` (simplified) or Orthanc's full form."""
        kind = "simplified-tags" if simplify else "tags"
        return self.get_json(f"/instances/{instance_id}/{kind}")

    def instance_metadata(self, instance_id: str) -> dict[str, Any]:
        """Orthanc's metadata (``SopClassUid``, ``RemoteAET``, ``TransferSyntax`` …)."""
        return self.get_json(f"/instances/{instance_id}/metadata?expand")

    def find_instances(
        self,
        *,
        sop_class_uid: str | None = None,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        modality: str | None = None,
    ) -> list[str]:
        """IDs of the instances matching every given filter (exact match)."""
        query: dict[str, str] = {}
        for tag, value in (
            ("SOPClassUID", sop_class_uid),
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_uid),
            ("Modality", modality),
        ):
            if value is not None:
                query[tag] = value
        if not query:
            return self.instances()
        return self.post_json("/tools/find", {"Level": "Instance", "Query": query})

    def wait_for_instances(
        self,
        predicate_or_count: int | Callable[[list[str]], Any],
        timeout_s: float = 30,
        interval_s: float = 0.2,
    ) -> list[str]:
        """Poll until at least N instances are stored, or ``predicate(ids)`` is truthy.

        Returns the instance IDs at that moment; raises ``TimeoutError`` otherwise.
        """
        if callable(predicate_or_count):
            predicate = predicate_or_count
            wanted = "predicate"
        else:
            count = int(predicate_or_count)
            wanted = f">= {count} instances"

            def predicate(ids: list[str]) -> bool:
                return len(ids) >= count

        deadline = time.monotonic() + timeout_s
        ids: list[str] = []
        while True:
            ids = self.instances()
            if predicate(ids):
                return ids
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Orthanc {self.ae_title}: {wanted} not reached in {timeout_s} s "
                    f"({len(ids)} instances stored)"
                )
            time.sleep(interval_s)

    def store_to_modality(
        self,
        modality: str,
        resource_ids: str | Iterable[str],
        *,
        synchronous: bool = True,
        timeout_s: float = 300,
    ) -> Any:
        """C-STORE resources (instance/series/study/patient IDs) to a configured modality.

        ``POST /modalities/<name>/store``; returns Orthanc's JSON answer. An association or
        store failure raises ``OrthancError`` (HTTP 500 with the DICOM error in the body).
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        payload = {"Resources": ids, "Synchronous": synchronous}
        return self.post_json(
            f"/modalities/{urllib.parse.quote(modality)}/store", payload, timeout_s=timeout_s
        )

    def echo_modality(self, modality: str, timeout_s: float = 30) -> bool:
        """C-ECHO from Orthanc to a configured modality."""
        try:
            self.request(
                "POST",
                f"/modalities/{urllib.parse.quote(modality)}/echo",
                b"{}",
                "application/json",
                timeout_s=timeout_s,
            )
        except OrthancError:
            return False
        return True

    def upload(self, source: str | os.PathLike[str] | bytes) -> Any:
        """Store DICOM through REST: one file (or bytes) -> Orthanc's answer; a folder -> list."""
        if isinstance(source, bytes | bytearray):
            data = bytes(source)
        else:
            path = Path(source)
            if path.is_dir():
                return [self.upload(p) for p in sorted(path.rglob("*")) if p.is_file()]
            data = path.read_bytes()
        return json.loads(self.request("POST", "/instances", data, "application/dicom"))

    def delete_all(self) -> None:
        """Delete every stored patient (and so every instance)."""
        for patient_id in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{patient_id}")


def _modality(entry: ModalityEntry) -> Any:
    if isinstance(entry, Mapping):
        return dict(entry)
    values = list(entry)
    if len(values) < 3:
        raise ValueError(f"modality {entry!r}: expected [AET, host, port]")
    aet, host, port, *rest = values
    return [str(aet), str(host), int(port), *rest]

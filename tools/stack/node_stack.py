"""The whole node on loopback: Redis, Orthanc as the PACS, `mammo-node serve` and one worker.

Used by `make demo`, the end-to-end tests and the benchmarks, so all three run exactly the same
topology as docker-compose.yml. Everything is started on free ports under one folder and stopped
by `stop()` (or the context manager), whatever happened: `stop()` also runs at exit, every child
gets SIGTERM if the process that started it dies (`setpriv --pdeathsig`, as in services.py), and
a script that calls `services.exit_on_termination_signals()` turns SIGTERM into a normal exit, so a
`kill` of the demo stops `serve` and the worker too.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from node.runs import read_record
from node.vocabulary import COMPREHENSIVE_3D_SR, SEGMENTATION
from tools.stack.services import OrthancService, RedisService, find_binary, free_port

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = ROOT / "models" / "mias-baseline"
NODE_AE_TITLE = "MAMMO_NODE"
PACS_MODALITY_NAME = "MAMMO_NODE"  # how Orthanc knows the node, as in docker-compose.yml
SR_SOP_CLASS = str(COMPREHENSIVE_3D_SR)
SEG_SOP_CLASS = str(SEGMENTATION)


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: mappings key by key, anything else (a list, a number)
    replaced. So an override names only the keys it changes (`{"node": {"port": 1}}` keeps the
    rest of `node`), here for the stack and in tests/support/settings.py for every test config."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class NodeStack:
    """Start with `start()`; every process writes its log under `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        quiet_period_s: float = 3.0,
        deadline_s: float = 120.0,
        send_attempts: int = 3,
        bundle_dir: Path = DEFAULT_BUNDLE,
        config_overrides: dict[str, Any] | None = None,
        with_worker: bool = True,
        dcmtk_tls_args: Sequence[str] = (),
        dicomweb: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.node_port = free_port()
        self.redis = RedisService(self.directory / "redis")
        self.orthanc = OrthancService(
            self.directory / "orthanc",
            modalities={PACS_MODALITY_NAME: [NODE_AE_TITLE, "127.0.0.1", self.node_port]},
            dicomweb=dicomweb,  # Orthanc's DICOMweb plugin, for a web viewer (tools/stack/viewer.py)
        )
        self.config_path = self.directory / "node.yaml"
        self.spool_dir = self.directory / "spool"
        self.quiet_period_s = quiet_period_s
        self.deadline_s = deadline_s
        self.send_attempts = send_attempts
        self.bundle_dir = bundle_dir
        self.config_overrides = config_overrides or {}
        self.with_worker = with_worker
        # With node.tls in config_overrides: dcmtk's TLS options for echo()/storescu(), e.g.
        # ("+tls", client_key, client_cert, "+cf", ca_cert).
        self.dcmtk_tls_args = tuple(dcmtk_tls_args)
        self.node: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "node": {"ae_title": NODE_AE_TITLE, "bind_address": "127.0.0.1",
                     "port": self.node_port, "network_timeout_s": 30},
            "allowed_callers": [
                {"ae_title": "STORESCU", "host": "127.0.0.1"},
                {"ae_title": self.orthanc.ae_title, "host": "127.0.0.1"},
            ],
            "destinations": [{"name": "pacs", "ae_title": self.orthanc.ae_title,
                              "host": "127.0.0.1", "port": self.orthanc.dicom_port,
                              "timeout_s": 30}],
            "spool": {"dir": str(self.spool_dir), "min_free_bytes": 100_000_000},
            "completion": {"quiet_period_s": self.quiet_period_s, "deadline_s": self.deadline_s,
                           "poll_interval_s": 0.2},
            "broker": {"url": f"redis://127.0.0.1:{self.redis.port}/0",
                       "password_env": "MAMMO_BROKER_PASSWORD", "queue": "mammo",
                       "publish_timeout_s": 3},
            "model": {"bundle_dir": str(self.bundle_dir), "device": "auto"},
            "send": {"attempts": self.send_attempts, "backoff_s": 0.5, "backoff_max_s": 5},
        }
        return merge_config(config, self.config_overrides)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAMMO_BROKER_PASSWORD"] = self.redis.password
        env["PYTHONPATH"] = str(ROOT)
        return env

    def _spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        command = [sys.executable, "-m", "node.cli", *args, "--config", str(self.config_path)]
        setpriv = shutil.which("setpriv")
        if setpriv:  # the child gets SIGTERM when this thread dies, however it dies
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return subprocess.Popen(
            command,
            cwd=ROOT, env={**self.env(), **(extra_env or {})}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start(self) -> NodeStack:
        atexit.register(self.stop)
        self.redis.start()
        self.orthanc.start()
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.start_node()
        if self.with_worker:
            self.start_worker()
        return self

    def start_node(self) -> None:
        self.node = self._spawn("node", "serve")
        self.wait_for_echo()

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", "worker")
        self.wait_for_worker()

    def wait_for_echo(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.node is not None and self.node.poll() is not None:
                raise RuntimeError(f"node exited: {self.log_tail('node')}")
            if self.echo() == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"node not answering C-ECHO: {self.log_tail('node')}")

    def wait_for_worker(self, timeout_s: float = 120.0) -> None:
        """Until a worker child has loaded the model (its log line says so)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_tail('worker')}")
            if '"event": "model_loaded"' in self.log_tail("worker", 200_000):
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker did not load the model: {self.log_tail('worker')}")

    def log_tail(self, name: str, limit: int = 4000) -> str:
        path = self.directory / f"{name}.log"
        try:
            return path.read_bytes()[-limit:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> None:
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, 15)
            process.wait(grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait(10)

    # --- faults (tests/faults) -------------------------------------------------------------------
    def start_new_worker(self, extra_env: dict[str, str] | None = None,
                         timeout_s: float = 120.0) -> None:
        """Start a worker (again) and wait until one of its children has loaded the model."""
        before = self.log_tail("worker", 10_000_000).count('"event": "model_loaded"')
        self.worker = self._spawn("worker", "worker", extra_env=extra_env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_tail('worker')}")
            if self.log_tail("worker", 10_000_000).count('"event": "model_loaded"') > before:
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker did not load the model: {self.log_tail('worker')}")

    def worker_children(self) -> list[int]:
        """PIDs of the worker's pool processes (the ones that run tasks)."""
        if self.worker is None or self.worker.poll() is not None:
            return []
        try:
            text = Path(f"/proc/{self.worker.pid}/task/{self.worker.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def kill_worker_child(self) -> int:
        """SIGKILL one pool process (what the OOM killer does to the biggest); returns its pid."""
        [pid, *_] = self.worker_children()
        os.kill(pid, 9)
        return pid

    def kill_worker(self) -> None:
        """SIGKILL the whole worker (main process and pool) at once: no clean shutdown."""
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, 9)
            self.worker.wait(10)

    def stop_worker(self) -> None:
        self._terminate(self.worker)

    def kill_node(self) -> None:
        """SIGKILL `mammo-node serve`: associations, watcher and reconciler die mid-step."""
        if self.node is not None and self.node.poll() is None:
            os.killpg(self.node.pid, 9)
            self.node.wait(10)

    def run_ids(self, state: str) -> list[str]:
        folder = self.spool_dir / state
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def stop(self) -> None:
        """Stop the worker, `serve`, Orthanc and Redis (idempotent; also registered with atexit)."""
        self._terminate(self.worker)
        self._terminate(self.node)
        self.orthanc.stop()
        self.redis.stop()
        atexit.unregister(self.stop)

    def __enter__(self) -> NodeStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- acting as a modality -------------------------------------------------------------------
    def echo(self) -> int:
        result = subprocess.run(
            [find_binary("echoscu"), "-aet", "STORESCU", "-aec", NODE_AE_TITLE, "-to", "5",
             *self.dcmtk_tls_args, "127.0.0.1", str(self.node_port)],
            capture_output=True, check=False,
        )
        return result.returncode

    def storescu(self, paths: Sequence[Path], *extra: str, calling_ae: str = "STORESCU",
                 called_ae: str = NODE_AE_TITLE) -> subprocess.CompletedProcess[str]:
        """Send files with dcmtk's storescu, proposing compressed syntaxes too (`-xv` etc.)."""
        return subprocess.run(
            [find_binary("storescu"), "-aet", calling_ae, "-aec", called_ae, "-to", "30",
             *self.dcmtk_tls_args, *extra, "127.0.0.1", str(self.node_port), *map(str, paths)],
            capture_output=True, text=True, check=False,
        )

    # --- the hospital flow: the PACS holds the study and sends it to the node -----------------------
    def send_through_pacs(self, paths: Sequence[Path], timeout_s: float = 300) -> str:
        """Store the files in Orthanc (as the modality would), then have Orthanc C-STORE the
        study to the node (`POST /modalities/MAMMO_NODE/store`), as a PACS routing rule does.
        The results then land beside the images they reference. Returns Orthanc's study ID."""
        study_ids = {self.orthanc.upload(path)["ParentStudy"] for path in paths}
        if len(study_ids) != 1:
            raise ValueError(f"the files belong to {len(study_ids)} studies, expected one")
        [study_id] = study_ids
        self.orthanc.store_to_modality(PACS_MODALITY_NAME, study_id, timeout_s=timeout_s)
        return str(study_id)

    # --- results --------------------------------------------------------------------------------
    def result_ids(self, study_uid: str) -> dict[str, list[str]]:
        """Orthanc IDs of our SR and SEG instances in the study."""
        return {
            "sr": self.orthanc.find_instances(study_uid=study_uid, sop_class_uid=SR_SOP_CLASS),
            "seg": self.orthanc.find_instances(study_uid=study_uid, sop_class_uid=SEG_SOP_CLASS),
        }

    def wait_for_results(self, study_uid: str, seg_count: int, timeout_s: float = 180.0
                         ) -> dict[str, list[str]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ids = self.result_ids(study_uid)
            if len(ids["sr"]) >= 1 and len(ids["seg"]) >= seg_count:
                return ids
            failed = self.records("failed")
            if any(r.get("study_uid") == study_uid for r in failed):
                raise RuntimeError(f"run failed: {json.dumps(failed)[:2000]}")
            time.sleep(0.3)
        raise TimeoutError(f"results not in Orthanc after {timeout_s} s; "
                           f"node: {self.log_tail('node')} worker: {self.log_tail('worker')}")

    def records(self, state: str = "done") -> list[dict[str, Any]]:
        records = []
        folder = self.spool_dir / state
        if not folder.is_dir():
            return []
        for run in sorted(folder.iterdir()):
            record = read_record(run)
            if record is not None:
                records.append(record.model_dump(mode="json"))  # as in record.json
        return records

    def wait_for_record(self, study_uid: str, timeout_s: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for state in ("done", "failed"):
                for record in self.records(state):
                    if record.get("study_uid") == study_uid:
                        return record
            time.sleep(0.3)
        raise TimeoutError(f"no record for the study after {timeout_s} s; "
                           f"worker: {self.log_tail('worker')}")

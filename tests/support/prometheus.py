"""A real Prometheus (Debian's `prometheus`) on a free loopback port, for the monitoring tests.

It scrapes the targets it is given every second with the bearer token from a file, loads rule
files, and answers PromQL through its HTTP API (`query`, `wait_for`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tools.stack.services import _Service, find_binary, free_port


class PrometheusService(_Service):
    """`prometheus` with a generated config: one job per target, scraped every second."""

    name = "prometheus"
    start_timeout_s = 60.0

    def __init__(self, directory: str | os.PathLike[str], targets: Mapping[str, str], *,
                 token: str | None = None, rule_files: Sequence[Path] = (),
                 scheme: str = "http") -> None:
        super().__init__(directory)
        self.binary = find_binary("prometheus")
        self.port = free_port()
        self.targets = dict(targets)  # job name -> "host:port"
        self.token = token
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scheme = scheme

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        job_defaults: dict[str, Any] = {"scheme": self.scheme}
        if self.token is not None:
            token_file = self.directory / "token"
            token_file.write_text(self.token)
            token_file.chmod(0o600)
            job_defaults["authorization"] = {"type": "Bearer",
                                             "credentials_file": str(token_file)}
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": job, **job_defaults,
                                "static_configs": [{"targets": [target]}]}
                               for job, target in self.targets.items()],
        }
        path = self.directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _command(self) -> list[str]:
        return [self.binary, f"--config.file={self._write_config()}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def _new_ports(self) -> bool:
        self.port = free_port()
        return True

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant vector: [{"metric": {labels}, "value": [time, "text"]}, ...]."""
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def wait_for(self, promql: str, predicate: Callable[[list[dict[str, Any]]], bool] = bool,
                 timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Poll a query until its result satisfies `predicate` (non-empty by default)."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.5)
        targets = self.api("targets")["activeTargets"]
        raise TimeoutError(f"{promql!r} never matched; last result {result}; targets "
                           f"{[(t['labels'].get('job'), t['health'], t['lastError']) for t in targets]}")

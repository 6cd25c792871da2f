"""Workers on other hosts (`claims.mode: redis`): a worker host that dies or is cut off mid-study
loses nothing and duplicates nothing.

The node (`mammo-node serve`), Redis and Orthanc run in this test's network namespace; each of
two worker hosts is a network namespace of its own (`ip netns`), joined to the node's by a veth
pair, running a real `mammo-node worker` that reaches Redis and Orthanc over that link. The
spool is shared as NFS would share it (here: the same local filesystem; this kernel has no NFS
client). N studies are sent; while one worker host is in the middle of a study, it is killed
(every process in its namespace, SIGKILL) or cut off (its veth set down: its processes live on
without Redis or the PACS). Every study must then be in Orthanc exactly once (its SR, CAD SR and
SEGs, sent once: one `results_sent` audit record per run) and every run in done/.

Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); without it the tests skip and
say why. Everything they create has a unique name and is removed in teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.audit import read_audit
from tests.support.fault_stack import (
    PAUSE_ENV,
    PAUSE_S,
    assert_delivered_exactly_once,
    new_study,
    send,
    wait_for_log,
)
from tools.stack.node_stack import ROOT, NodeStack, merge_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]

STUDIES = 5
LEASE_S = 3
# Recovery in seconds, not minutes: reconcile every second, an abandoned run after 2 s.
NODE_CONFIG: dict[str, Any] = {
    "claims": {"mode": "redis", "lease_seconds": LEASE_S},
    "reconcile": {"interval_s": 1, "republish_after_s": 5, "abandoned_after_s": 2},
    "scoring": {"max_attempts": 3},
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    return subprocess.run([ip, *args], capture_output=True, text=True, check=check)


def _namespaces_refused() -> str | None:
    """Why this test may not create network namespaces, or None when it may."""
    if shutil.which("ip") is None and not Path("/usr/sbin/ip").exists():
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    probe = f"mnprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused: {made.stderr.strip()[:200]}"
    try:
        veth = _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
                   check=False)
        if veth.returncode != 0:
            return f"no veth pairs here: {veth.stderr.strip()[:200]}"
    finally:
        _ip("netns", "del", probe, check=False)  # takes the probe pair along
    return None


def _free_subnet(used: set[str]) -> str:
    """A /30 in 10.0.0.0/8 that no interface of this machine uses ("10.a.b")."""
    addresses = _ip("-4", "-o", "addr").stdout
    for a in range(201, 255):
        for b in range(0, 256, 7):
            prefix = f"10.{a}.{b}"
            if prefix not in used and f" {prefix}." not in addresses:
                used.add(prefix)
                return prefix
    raise RuntimeError("no free 10.x.y.0/30 subnet")


class WorkerHost:
    """A worker host: its own network namespace, a veth pair to the node's, one worker."""

    def __init__(self, stack: NodeStack, name: str, subnet: str) -> None:
        tag = f"{os.getpid() % 100000}{name}"
        self.stack = stack
        self.name = name
        self.namespace = f"mammo-{tag}"
        self.node_side = f"mnv{tag}"[:15]  # in the node's namespace
        self.host_side = f"mnh{tag}"[:15]  # in the worker host's
        self.node_address = f"{subnet}.1"
        self.host_address = f"{subnet}.2"
        self.log_name = f"worker-{name}"
        self.process: subprocess.Popen[bytes] | None = None

    def create(self) -> WorkerHost:
        ns = self.namespace
        _ip("netns", "add", ns)
        _ip("link", "add", self.node_side, "type", "veth", "peer", "name", self.host_side,
            "netns", ns)
        _ip("addr", "add", f"{self.node_address}/30", "dev", self.node_side)
        _ip("link", "set", self.node_side, "up")
        _ip("-n", ns, "addr", "add", f"{self.host_address}/30", "dev", self.host_side)
        _ip("-n", ns, "link", "set", self.host_side, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def config(self) -> dict[str, Any]:
        """The node's config as this host sees it: Redis and the PACS at the node's address on
        its link, the same spool path (what an NFS mount would give it)."""
        stack = self.stack
        return merge_config(stack.config(), {
            "broker": {"url": f"redis://{self.node_address}:{stack.redis.port}/0"},
            "destinations": [{"name": "pacs", "ae_title": stack.orthanc.ae_title,
                              "host": self.node_address, "port": stack.orthanc.dicom_port,
                              "timeout_s": 30}],
        })

    def start_worker(self) -> None:
        config_path = self.stack.directory / f"{self.log_name}.yaml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        log = open(self.stack.directory / f"{self.log_name}.log", "ab")  # noqa: SIM115
        ip = shutil.which("ip") or "/usr/sbin/ip"
        command = [ip, "netns", "exec", self.namespace, sys.executable, "-m", "node.cli",
                   "worker", "--config", str(config_path)]
        setpriv = shutil.which("setpriv")
        if setpriv:  # `ip netns exec` execs: the worker gets SIGTERM if this test dies
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env={**self.stack.env(), PAUSE_ENV: str(PAUSE_S)}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_loaded(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log_tail()}")
            if '"event": "model_loaded"' in self.stack.log_tail(self.log_name, 10_000_000):
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker {self.name} did not load the model: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.stack.log_tail(self.log_name)

    def pids(self) -> list[int]:
        found = _ip("netns", "pids", self.namespace, check=False).stdout
        return [int(pid) for pid in found.split()]

    def kill(self) -> None:
        """The host dies: every process in its namespace, SIGKILL, nobody told."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        if self.process is not None:
            self.process.wait(10)

    def cut_off(self) -> None:
        """The host's network is gone (its processes run on, reaching nothing)."""
        _ip("link", "set", self.node_side, "down")

    def remove(self) -> None:
        self.kill()
        _ip("netns", "del", self.namespace, check=False)  # takes its end of the pair along
        _ip("link", "del", self.node_side, check=False)


@pytest.fixture
def remote_stack(tmp_path: Path) -> Iterator[tuple[NodeStack, list[WorkerHost]]]:
    """The node with Redis and Orthanc here, two worker hosts in their own namespaces."""
    refused = _namespaces_refused()
    if refused:
        pytest.skip(refused)
    stack = NodeStack(tmp_path / "stack", config_overrides=NODE_CONFIG, with_worker=False)
    stack.redis.host = "0.0.0.0"  # the node's addresses on every link (a password guards it)
    subnets: set[str] = set()
    hosts: list[WorkerHost] = []
    try:
        stack.start()
        for name in ("a", "b"):
            hosts.append(WorkerHost(stack, name, _free_subnet(subnets)).create())
        for host in hosts:
            host.start_worker()
        for host in hosts:
            host.wait_loaded()
        yield stack, hosts
    finally:
        for host in hosts:
            host.remove()
        stack.stop()


def _send_studies(stack: NodeStack, tmp_path: Path, seed: int) -> list[str]:
    study_uids = []
    for index in range(STUDIES):
        paths, study_uid = new_study(tmp_path / f"study-{index}", seed=seed + index)
        send(stack, paths)
        study_uids.append(study_uid)
    return study_uids


def _run_of_paused_study(stack: NodeStack, host: WorkerHost) -> str:
    """The run `host` is in the middle of (its worker paused before inference)."""
    line = wait_for_log(stack, host.log_name, "test_pause_before_inference", timeout_s=120)
    [run_id] = [r for r in stack.run_ids("work") if r in line]
    return run_id


def _assert_every_study_delivered_once(stack: NodeStack, study_uids: list[str]) -> None:
    for study_uid in study_uids:
        assert_delivered_exactly_once(stack, study_uid, views=4, timeout_s=180)
    done = stack.run_ids("done")
    assert len(done) == STUDIES
    assert stack.run_ids("queued") == stack.run_ids("work") == stack.run_ids("failed") == []
    # Sent once, not merely stored once: one results_sent per run, none failed.
    events = read_audit(stack.spool_dir / "audit.jsonl")
    sent = sorted(e["run_id"] for e in events if e["event"] == "results_sent")
    assert sent == sorted(done), sent
    assert not [e for e in events if e["event"] == "results_send_failed"]


@pytest.mark.timeout(420)
def test_a_worker_host_killed_mid_study_loses_and_duplicates_nothing(
    remote_stack: tuple[NodeStack, list[WorkerHost]], tmp_path: Path
) -> None:
    stack, [victim, survivor] = remote_stack
    study_uids = _send_studies(stack, tmp_path, seed=301)
    run_id = _run_of_paused_study(stack, victim)
    victim.kill()
    started = time.monotonic()
    wait_for_log(stack, "node", "run_abandoned_requeued", contains=run_id, timeout_s=60)
    requeued_s = time.monotonic() - started
    _assert_every_study_delivered_once(stack, study_uids)
    record = [r for r in stack.records("done") if r["run_id"] == run_id]
    assert record and record[0]["attempts"] == 2  # the killed attempt counted
    assert survivor.process is not None and survivor.process.poll() is None
    print(f"worker host killed mid-study: its run back in queued/ after {requeued_s:.1f} s "
          f"(lease {LEASE_S} s + abandoned_after_s 2 s + reconcile pass)")


@pytest.mark.timeout(420)
def test_a_worker_host_cut_off_mid_study_loses_and_duplicates_nothing(
    remote_stack: tuple[NodeStack, list[WorkerHost]], tmp_path: Path
) -> None:
    stack, [survivor, victim] = remote_stack
    study_uids = _send_studies(stack, tmp_path, seed=401)
    run_id = _run_of_paused_study(stack, victim)
    victim.cut_off()
    started = time.monotonic()
    # The cut-off worker goes on scoring, then its fence refuses it: it writes and sends nothing.
    wait_for_log(stack, victim.log_name, "run_lease_lost", contains=run_id, timeout_s=60)
    fenced_s = time.monotonic() - started
    wait_for_log(stack, "node", "run_abandoned_requeued", contains=run_id, timeout_s=60)
    _assert_every_study_delivered_once(stack, study_uids)
    record = [r for r in stack.records("done") if r["run_id"] == run_id]
    assert record and record[0]["attempts"] == 2  # the cut-off attempt counted
    assert victim.process is not None and victim.process.poll() is None  # alive, cut off
    print(f"worker host cut off mid-study: fenced {fenced_s:.1f} s after the cut "
          f"(includes a {PAUSE_S:g} s test pause)")

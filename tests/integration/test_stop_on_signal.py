"""`kill` (SIGTERM) or Ctrl-C (SIGINT) of the demo, or of any script holding a NodeStack, stops
every process it started (serve, the worker and its pool, Redis, Orthanc) and frees their ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.stack.node_stack import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.requires_bin("storescu", "Orthanc", "redis-server")]

LISTEN = "0A"  # TCP state in /proc/net/tcp


def _descendants(root: int) -> dict[int, str]:
    """PID -> start time (to tell a PID reused later) of every process below `root`."""
    parents: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        started[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = started[child]
                frontier.append(child)
    return found


def _alive(pid: int, started: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


def _listening_ports(pids: set[int]) -> set[int]:
    """TCP ports in LISTEN held by these processes (socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return {port for port, inode in _listeners() if inode in inodes}


def _listeners() -> set[tuple[int, str]]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN:
                found.add((int(fields[1].rsplit(":", 1)[1], 16), fields[9]))
    return found


def _wait_for(path: Path, marker: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{marker!r} never printed:\n{path.read_text(errors='replace')[-4000:]}")


def _signal_and_check(command: list[str], marker: str, sig: signal.Signals, tmp_path: Path,
                      expected_names: set[str], again_at: str | None = None,
                      returncode: int | None = None) -> str:
    """Start `command`, wait for `marker`, send `sig` (and, with `again_at`, the same signal
    again once that text is printed), then check that everything it started is gone (and, given
    `returncode`, that it exited with it)."""
    output = tmp_path / "output.txt"
    with output.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    _wait_for(output, marker, process, timeout_s=500)
    children = _descendants(process.pid)
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in children}
    assert expected_names <= names, names
    ports = _listening_ports(set(children))
    assert ports, "the started services listen on no port?"

    process.send_signal(sig)
    if again_at is not None:
        _wait_for(output, again_at, process, timeout_s=60)
        process.send_signal(sig)  # a second Ctrl-C while it stops
    code = process.wait(timeout=120)
    if returncode is not None:
        assert code == returncode, output.read_text(errors="replace")[-3000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in children.items()):
        time.sleep(0.5)
    still = {pid: Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200]
             for pid, started in children.items() if _alive(pid, started)}
    assert still == {}, f"left running after {sig.name}: {still}"
    assert not {port for port, _ in _listeners()} & ports, "a port of the stopped stack still listens"
    return output.read_text(errors="replace")


def test_sigterm_of_the_demo_stops_everything_it_started(tmp_path: Path) -> None:
    """`kill` once its services are up (a service manager stopping it): SIGTERM unwinds as
    Ctrl-C does, wherever the demo is (waiting with --keep included: the same SystemExit
    through the same `finally`; Ctrl-C there: tests/integration/test_demo.py), and the demo
    ends with 128 + 15, as a process killed by SIGTERM reports."""
    out = _signal_and_check([sys.executable, "-m", "tools.demo", "--keep", "--dir", str(tmp_path / "d")],
                            "  ready in ", signal.SIGTERM, tmp_path, {"redis-server", "Orthanc"},
                            returncode=128 + signal.SIGTERM)
    assert "Stopping what the demo started" in out
    assert "Traceback" not in out


def test_ctrl_c_twice_on_the_demo_still_stops_everything_quietly(tmp_path: Path) -> None:
    """The first Ctrl-C arrives while the study is on its way (sent by the PACS, scored by the
    worker), the second while the demo stops its services: it is ignored, so the stop runs to
    its end, with one line and no traceback on the user's terminal, and the demo ends with 130.
    (Ctrl-C once the study is through, with --keep: tests/integration/test_demo.py.)"""
    out = _signal_and_check([sys.executable, "-m", "tools.demo", "--keep", "--dir", str(tmp_path / "d")],
                            "The modality stores a synthetic", signal.SIGINT, tmp_path,
                            {"redis-server", "Orthanc"}, again_at="Stopping what the demo started",
                            returncode=130)
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "Interrupted: everything the demo started is stopped." in out
    assert "--keep: services left running" not in out  # stopped mid-way, not at the end


STACK_SCRIPT = """
import time
from tools.stack.node_stack import NodeStack
from tools.stack.services import exit_on_termination_signals
exit_on_termination_signals()
with NodeStack(__import__("pathlib").Path(__import__("sys").argv[1]), with_worker=False):
    print("stack up", flush=True)
    while True:
        time.sleep(1)
"""


def test_sigint_of_a_script_holding_a_node_stack_stops_it(tmp_path: Path) -> None:
    # started with SIGINT ignored, as a background job of a script would be: still stops
    command = [sys.executable, "-c", STACK_SCRIPT, str(tmp_path / "s")]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _signal_and_check(command, "stack up", signal.SIGINT, tmp_path, {"redis-server", "Orthanc"})
    finally:
        signal.signal(signal.SIGINT, previous)

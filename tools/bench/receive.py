"""C-STORE throughput of the node against dcmtk's storescp and Orthanc, in the same run.

dcmtk's storescu sends the same uncompressed 4-view study (4 x 27 MB at full size) to each
receiver in turn, several rounds, interleaved so that machine noise hits all of them alike.
Reports MB/s (median over rounds), the node's ratio to each reference, and peak RSS.

    .venv/bin/python -m tools.bench.receive [--rounds 5] [--pdu 131072]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tools.stack.make_study import make_study
from tools.stack.services import OrthancService, find_binary, free_port

ROOT = Path(__file__).resolve().parents[2]


def _peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process (its peak resident set)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = subprocess.run([find_binary("echoscu"), "-aet", "STORESCU", "-aec", "ANY",
                                 "-to", "2", "127.0.0.1", str(port)], capture_output=True)
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing answering C-ECHO on {port}")


class Receiver:
    def __init__(self, name: str, port: int, called_ae: str, process_pid: int, stop) -> None:
        self.name, self.port, self.called_ae, self.pid, self.stop = (
            name, port, called_ae, process_pid, stop)
        self.seconds: list[float] = []


def start_node(work: Path, pdu: int) -> Receiver:
    port = free_port()
    config = {
        "node": {"ae_title": "ANY", "bind_address": "127.0.0.1", "port": port,
                 "max_pdu_bytes": pdu},
        "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
        "spool": {"dir": str(work / "node-spool"), "min_free_bytes": 0},
        # No broker in this benchmark: completed studies stay queued, which costs nothing here.
        "completion": {"quiet_period_s": 3600, "deadline_s": 7200},
        "broker": {"url": f"redis://127.0.0.1:{free_port()}/0", "publish_timeout_s": 0.2},
    }
    config_path = work / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = open(work / "node.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "node.cli", "--log-level", "WARNING",
                                "serve", "--config", str(config_path)],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    _wait_port(port)

    def stop() -> None:
        process.terminate()
        process.wait(30)

    return Receiver("mammo-node serve", port, "ANY", process.pid, stop)


def start_storescp(work: Path, pdu: int, bit_preserving: bool) -> Receiver:
    port = free_port()
    out = work / ("storescp-B" if bit_preserving else "storescp")
    out.mkdir()
    args = [find_binary("storescp"), "-od", str(out), "-pm", "-pdu", str(pdu)]
    if bit_preserving:
        args.append("+B")
    process = subprocess.Popen([*args, str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_port(port)

    def stop() -> None:
        process.terminate()
        process.wait(30)

    name = "dcmtk storescp +B" if bit_preserving else "dcmtk storescp"
    return Receiver(name, port, "ANY", process.pid, stop)


def start_orthanc(work: Path, pdu: int) -> Receiver:
    orthanc = OrthancService(work / "orthanc", ae_title="ORTHANC", always_allow_store=True,
                             check_called_aet=False, max_pdu_bytes=min(pdu, 131072))
    orthanc.start()

    def stop() -> None:
        orthanc.stop()

    return Receiver("Orthanc 1.10", orthanc.dicom_port, "ORTHANC", orthanc.pid or 0, stop)


def send(receiver: Receiver, paths: list[Path], pdu: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [find_binary("storescu"), "-aet", "STORESCU", "-aec", receiver.called_ae,
         "-pdu", str(pdu), "127.0.0.1", str(receiver.port), *map(str, paths)],
        capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{receiver.name}: storescu failed: {result.stderr[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pdu", type=int, default=131072)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=3328)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    receivers: list[Receiver] = []
    try:
        paths = make_study(work / "study", rows=args.rows, cols=args.cols, seed=1)
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        receivers = [start_node(work, args.pdu), start_storescp(work, args.pdu, False),
                     start_storescp(work, args.pdu, True), start_orthanc(work, args.pdu)]
        for receiver in receivers:  # warm-up round, not counted
            send(receiver, paths, args.pdu)
        for _ in range(args.rounds):
            for receiver in receivers:
                receiver.seconds.append(send(receiver, paths, args.pdu))
        rates = {r.name: total_mb / statistics.median(r.seconds) for r in receivers}
        node_rate = rates["mammo-node serve"]
        print(f"\nC-STORE throughput: storescu -> receiver, {len(paths)} x "
              f"{total_mb / len(paths):.1f} MB uncompressed MG ({args.rows} x {args.cols}), "
              f"PDU {args.pdu}, median of {args.rounds} rounds after 1 warm-up\n")
        print(f"Machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}\n")
        print("| receiver | MB/s (median) | min–max MB/s | node ÷ receiver | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for receiver in receivers:
            fastest = total_mb / min(receiver.seconds)
            slowest = total_mb / max(receiver.seconds)
            print(f"| {receiver.name} | {rates[receiver.name]:.0f} | {slowest:.0f}–{fastest:.0f} "
                  f"| {node_rate / rates[receiver.name]:.2f} | "
                  f"{_peak_rss_mib(receiver.pid):.0f} |")
        return 0
    finally:
        for receiver in receivers:
            try:
                receiver.stop()
            except Exception:  # noqa: BLE001 - best effort cleanup of benchmark processes
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

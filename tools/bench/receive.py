"""C-STORE throughput of the node against dcmtk's storescp and Orthanc, in the same run.

dcmtk's storescu sends the same uncompressed 4-view study (4 x 27 MB at full size) to each
receiver in turn, several rounds, interleaved so that machine noise hits all of them alike.
Reports MB/s (median over rounds), the node's ratio to each reference, peak RSS, and the load
average before and after (the ratios are what compare across runs on a shared machine).

With `--tomo-gib`, the node then receives one breast tomosynthesis object of that size (frames
of the same image, written and sent as a stream: no process holds it whole) while its resident
set is sampled every 20 ms: it must stay flat, since a data set goes to disk as it arrives.

With `--associations N`, each round sends N distinct studies at once, one association each
(concurrent associations: the node's group commit shares their fsyncs).

    .venv/bin/python -m tools.bench.receive [--rounds 5] [--pdu 131072] [--associations 1]
        [--tomo-gib 1.9]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.vocabulary import BREAST_TOMOSYNTHESIS
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


def _rss_mib(pid: int) -> float:
    """VmRSS of a live process (its resident set now)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def write_tomosynthesis(frame_source: Path, path: Path, target_bytes: int) -> Path:
    """A breast tomosynthesis object of about `target_bytes`: the header of `frame_source` (an
    uncompressed MG image) as a multi-frame object, its pixels repeated as frames. The Pixel
    Data element is written by hand after the header, frame by frame, so this process never
    holds more than one frame."""
    source = dcmread(frame_source)
    frame = source.PixelData
    frames = max(1, target_bytes // len(frame))
    del source.PixelData
    source.SOPClassUID = BREAST_TOMOSYNTHESIS
    source.file_meta.MediaStorageSOPClassUID = BREAST_TOMOSYNTHESIS
    source.SOPInstanceUID = generate_uid()
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    source.StudyInstanceUID = generate_uid()
    source.SeriesInstanceUID = generate_uid()
    source.NumberOfFrames = frames
    source.save_as(path, enforce_file_format=True)
    with open(path, "ab") as handle:  # (7FE0,0010) OW, explicit VR little endian
        handle.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frames * len(frame)))
        for _ in range(frames):
            handle.write(frame)
    return path


def tomosynthesis_rss(receiver: Receiver, path: Path, pdu: int, spool: Path) -> dict[str, float]:
    """Send one large object to the node while sampling its VmRSS every 20 ms; checks that it
    landed in the node's spool whole."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_mib(receiver.pid))
            time.sleep(0.02)

    before = _rss_mib(receiver.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds = send(receiver, [path], pdu, "--required")  # BTO is not in its default list
    finally:
        done.set()
        sampler.join()
    stored = [f for f in (spool / "incoming").glob("*/*.dcm")
              if f.stat().st_size >= path.stat().st_size - 1024]
    if not stored:
        raise RuntimeError("the tomosynthesis object is not in the node's spool")
    return {"bytes": path.stat().st_size, "seconds": seconds, "before": before,
            "peak": max(samples, default=before), "after": _rss_mib(receiver.pid),
            "samples": len(samples)}


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


def send(receiver: Receiver, paths: list[Path], pdu: int, *extra: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [find_binary("storescu"), "-aet", "STORESCU", "-aec", receiver.called_ae,
         "-pdu", str(pdu), *extra, "127.0.0.1", str(receiver.port), *map(str, paths)],
        capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{receiver.name}: storescu failed: {result.stderr[-500:]}")
    return elapsed


def send_at_once(receiver: Receiver, studies: list[list[Path]], pdu: int) -> float:
    """One storescu (one association) per study, all at the same time; seconds until the last
    is done."""
    started = time.perf_counter()
    senders = [subprocess.Popen(
        [find_binary("storescu"), "-aet", "STORESCU", "-aec", receiver.called_ae,
         "-pdu", str(pdu), "127.0.0.1", str(receiver.port), *map(str, paths)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for paths in studies]
    failures = [sender.communicate()[1] for sender in senders if sender.wait() != 0]
    elapsed = time.perf_counter() - started
    for sender in senders:
        if sender.stderr is not None:
            sender.stderr.close()
    if failures:
        raise RuntimeError(f"{receiver.name}: storescu failed: {failures[0][-500:]!r}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pdu", type=int, default=131072)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=3328)
    parser.add_argument("--associations", type=int, default=1,
                        help="studies sent at once, one association each (distinct studies)")
    parser.add_argument("--tomo-gib", type=float, default=0.0,
                        help="then send one tomosynthesis object of this size to the node")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    receivers: list[Receiver] = []
    try:
        studies = [make_study(work / f"study-{n}", rows=args.rows, cols=args.cols, seed=1 + n)
                   for n in range(args.associations)]
        paths = studies[0]
        total_mb = sum(p.stat().st_size for study in studies for p in study) / 1e6

        def one_round(receiver: Receiver) -> float:
            if len(studies) == 1:
                return send(receiver, paths, args.pdu)
            return send_at_once(receiver, studies, args.pdu)

        receivers = [start_node(work, args.pdu), start_storescp(work, args.pdu, False),
                     start_storescp(work, args.pdu, True), start_orthanc(work, args.pdu)]
        load_before = os.getloadavg()
        for receiver in receivers:  # warm-up round, not counted
            one_round(receiver)
        for _ in range(args.rounds):
            for receiver in receivers:
                receiver.seconds.append(one_round(receiver))
        rates = {r.name: total_mb / statistics.median(r.seconds) for r in receivers}
        node_rate = rates["mammo-node serve"]
        at_once = (f"{len(studies)} associations at once, each " if len(studies) > 1 else "")
        print(f"\nC-STORE throughput: storescu -> receiver, {at_once}{len(paths)} x "
              f"{total_mb / len(studies) / len(paths):.1f} MB uncompressed MG "
              f"({args.rows} x {args.cols}), PDU {args.pdu}, median of {args.rounds} rounds "
              f"after 1 warm-up\n")
        load_after = os.getloadavg()
        print(f"Machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; load average (1 min) {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} after\n")
        print("| receiver | MB/s (median) | min–max MB/s | node ÷ receiver | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for receiver in receivers:
            fastest = total_mb / min(receiver.seconds)
            slowest = total_mb / max(receiver.seconds)
            print(f"| {receiver.name} | {rates[receiver.name]:.0f} | {slowest:.0f}–{fastest:.0f} "
                  f"| {node_rate / rates[receiver.name]:.2f} | "
                  f"{_peak_rss_mib(receiver.pid):.0f} |")
        if args.tomo_gib > 0:
            big = write_tomosynthesis(paths[0], work / "tomo.dcm", int(args.tomo_gib * 2**30))
            node = receivers[0]
            result = tomosynthesis_rss(node, big, args.pdu, work / "node-spool")
            print(f"\nOne breast tomosynthesis object, {result['bytes'] / 2**30:.2f} GiB, to "
                  f"the node in {result['seconds']:.1f} s "
                  f"({result['bytes'] / 1e6 / result['seconds']:.0f} MB/s): VmRSS "
                  f"{result['before']:.0f} MiB before, at most {result['peak']:.0f} MiB "
                  f"during ({result['samples']} samples every 20 ms), {result['after']:.0f} MiB "
                  f"after; peak RSS of the whole run {_peak_rss_mib(node.pid):.0f} MiB")
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

"""Group commit against a real `mammo-node serve`: associations receiving at once share their
commits, every instance answered with success is on disk with its manifest line, and a SIGKILL
of the node at any moment never takes away an instance it had acknowledged.

The senders are pynetdicom associations in this process (one thread each), so the test knows
exactly which C-STOREs were answered 0x0000 before the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation, Verification

from node.pynetdicom_internals import RequestorAE
from node.runs import InstanceEntry, read_manifest
from node.spool import Spool
from tests.support.settings import write_config
from tools.stack.make_study import make_study

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ASSOCIATIONS = 4
STUDIES_PER_ASSOCIATION = 3  # four views each


class Serve:
    """`mammo-node serve` in its own process group, killable at once."""

    def __init__(self, directory: Path) -> None:
        self.config = write_config(directory / "node.yaml", listener=True)
        settings = yaml.safe_load(self.config.read_text())
        self.port = int(settings["node"]["port"])
        self.spool_dir = Path(settings["spool"]["dir"])
        self.log = directory / "node.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve",
                 "--config", str(self.config)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for_echo()

    def _wait_for_echo(self, timeout_s: float = 60) -> None:
        ae = RequestorAE(ae_title="STORESCU")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            assoc = ae.associate("127.0.0.1", self.port, ae_title="MAMMO_NODE")
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                if status and status.Status == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"serve never answered C-ECHO: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Dataset]]:
    """One list of instances per association: distinct studies, 1.7 MB each."""
    folder = tmp_path_factory.mktemp("studies")
    per_association: list[list[Dataset]] = []
    for number in range(ASSOCIATIONS):
        instances = []
        for study in range(STUDIES_PER_ASSOCIATION):
            seed = 1000 + number * STUDIES_PER_ASSOCIATION + study
            instances += [dcmread(path) for path in make_study(folder / str(seed), seed=seed)]
        per_association.append(instances)
    return per_association


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    node = Serve(tmp_path)
    try:
        yield node
    finally:
        node.stop()


def _send(port: int, instances: list[Dataset], acknowledged: dict[str, str],
          lock: threading.Lock) -> None:
    """One association: C-STORE each instance, noting those answered 0x0000 (SOP -> study)."""
    ae = RequestorAE(ae_title="STORESCU")
    ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation,
                             instances[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMO_NODE")
    if not assoc.is_established:
        return
    try:
        for dataset in instances:
            try:
                status = assoc.send_c_store(dataset)
            except Exception:  # noqa: BLE001 - the node was killed under us
                return
            if not status or status.Status != 0:
                return
            with lock:
                acknowledged[str(dataset.SOPInstanceUID)] = str(dataset.StudyInstanceUID)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_concurrently(node: Serve, studies: list[list[Dataset]], kill_after: int | None = None
                       ) -> dict[str, str]:
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    senders = [threading.Thread(target=_send, args=(node.port, instances, acknowledged, lock))
               for instances in studies]
    for sender in senders:
        sender.start()
    if kill_after is not None:
        deadline = time.monotonic() + 120
        while len(acknowledged) < kill_after and time.monotonic() < deadline:
            time.sleep(0.001)
        node.kill()  # mid-stream: other associations are between write and commit
    for sender in senders:
        sender.join(120)
    with lock:
        return dict(acknowledged)


def _recorded(spool_dir: Path) -> dict[str, tuple[Path, InstanceEntry]]:
    """Every manifest line in the spool, by SOP Instance UID: a study still arriving sits in
    incoming/, one the watcher found complete (four views in) has moved on as a run."""
    found: dict[str, tuple[Path, InstanceEntry]] = {}
    for state in ("incoming", "queued", "work", "done", "failed"):
        root = spool_dir / state
        for folder in sorted(root.iterdir()) if root.is_dir() else ():
            for entry in read_manifest(folder):
                found[entry.sop_uid] = (folder, entry)
    return found


def _assert_on_disk(spool_dir: Path, acknowledged: dict[str, str],
                    studies: list[list[Dataset]]) -> None:
    """Every acknowledged instance: a manifest line in its study or run folder, its file
    complete (its pixel data byte for byte what was sent)."""
    sent = {str(ds.SOPInstanceUID): ds for instances in studies for ds in instances}
    recorded = _recorded(spool_dir)
    for sop_uid in acknowledged:
        assert sop_uid in recorded, f"acknowledged {sop_uid} has no manifest line"
        folder, entry = recorded[sop_uid]
        path = folder / entry.file
        assert path.is_file(), f"acknowledged {sop_uid} has no file"
        assert path.stat().st_size == entry.size_bytes
        received = dcmread(path)
        assert str(received.SOPInstanceUID) == sop_uid
        assert received.PixelData == sent[sop_uid].PixelData
    # a node restarting on this spool finds them all: in incoming/ or as claimed runs
    restarted = Spool(spool_dir)
    found = {entry.sop_uid for study in restarted.incoming_studies() for entry in study.instances}
    for state in ("queued", "work", "done", "failed"):
        for run_id in restarted.runs(state):
            found |= {entry.sop_uid for entry in read_manifest(restarted.state_dir(state) / run_id)}
    assert set(acknowledged) <= found


def test_concurrent_associations_have_every_instance_recorded_once(
        serve: Serve, studies: list[list[Dataset]]) -> None:
    acknowledged = _send_concurrently(serve, studies)
    assert len(acknowledged) == ASSOCIATIONS * STUDIES_PER_ASSOCIATION * 4
    serve.stop()  # the watcher moves complete studies on: look at a spool that stands still
    _assert_on_disk(serve.spool_dir, acknowledged, studies)
    for folder in (serve.spool_dir / "incoming").iterdir():
        lines = (folder / "manifest.jsonl").read_text().splitlines()
        assert len(lines) == 4, "one manifest line per instance"
    assert not list((serve.spool_dir / "tmp").iterdir()), "nothing left half-received"


@pytest.mark.parametrize("kill_after", [1, 7, 19, 33])
def test_a_killed_node_keeps_every_instance_it_acknowledged(
        serve: Serve, studies: list[list[Dataset]], kill_after: int) -> None:
    acknowledged = _send_concurrently(serve, studies, kill_after=kill_after)
    assert len(acknowledged) >= kill_after
    assert len(acknowledged) < ASSOCIATIONS * STUDIES_PER_ASSOCIATION * 4, \
        "the kill came after the last instance: the test did not test a crash"
    _assert_on_disk(serve.spool_dir, acknowledged, studies)

"""A full or nearly full spool disk: the sender always gets an answer, nothing partial stays.

The spool is a small tmpfs mounted for the test (CI runs as root); where mounting is not allowed
the tests skip with the reason. The node runs in this process (listener only); dcmtk's storescu
is the modality, pynetdicom holds an association open where a test needs one that predates the
disk filling up.

- below `spool.min_free_bytes` a new association that proposes storage gets A-ASSOCIATE-RJ
  rejected-transient / service-provider (presentation) / local-limit-exceeded, a Verification-only
  one is still admitted (C-ECHO answers), and a C-STORE on an already open association gets 0xA700
  without its data set being written;
- with the watermark at 0 the disk really fills mid-write (ENOSPC inside pynetdicom's chunked
  receive): 0xA700 on that C-STORE and the following ones, never a hung sender (stock pynetdicom
  3.0.4 leaves it waiting forever, see node/receive.py);
- in every case spool/tmp is empty afterwards, and once space is freed the node accepts again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from node.pynetdicom_internals import RequestorAE
from node.service import NodeService
from tests.support.settings import make_settings
from tools.stack.make_study import make_study
from tools.stack.services import find_binary

pytestmark = [pytest.mark.integration, pytest.mark.requires_bin("storescu", "echoscu")]

TMPFS_BYTES = 8 * 1024 * 1024
ROWS, COLS = 1024, 832  # 1.7 MB per uncompressed instance
MG = "1.2.840.10008.5.1.4.1.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at tmp_path/spool, unmounted afterwards."""
    mount_point = tmp_path / "spool"
    mount_point.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                             str(mount_point)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def _node(spool_dir: Path, min_free_bytes: int) -> NodeService:
    settings = make_settings(spool_dir, listener=True, node={"network_timeout_s": 20},
                             spool={"dir": str(spool_dir), "min_free_bytes": min_free_bytes})
    service = NodeService(settings)
    service.scp.start()
    return service


def _instances(folder: Path, count: int) -> list[Path]:
    """`count` distinct uncompressed MG instances (4 views per synthetic study)."""
    paths: list[Path] = []
    seed = 0
    while len(paths) < count:
        paths += make_study(folder / f"s{seed}", rows=ROWS, cols=COLS, seed=100 + seed)
        seed += 1
    return paths[:count]


def _storescu(node: NodeService, paths: list[Path]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Send in one association; dcmtk's own timeouts bound every wait (a hang fails the test)."""
    started = time.monotonic()
    result = subprocess.run(
        [find_binary("storescu"), "-v", "-aet", "STORESCU", "-aec", "MAMMO_NODE",
         "-to", "20", "-ta", "20", "-td", "20",
         "127.0.0.1", str(node.settings.node.port), *map(str, paths)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    return result, time.monotonic() - started


def _statuses(output: str) -> list[str]:
    """The status of every C-STORE response storescu reports, in order."""
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


def _echo(node: NodeService) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("echoscu"), "-aet", "STORESCU", "-aec", "MAMMO_NODE", "-to", "10",
         "127.0.0.1", str(node.settings.node.port)],
        capture_output=True, text=True, check=False, timeout=60,
    )


def _ballast(spool_dir: Path, leave_free_bytes: int) -> Path:
    """Fill the tmpfs until `leave_free_bytes` remain (a file outside the spool's folders)."""
    path = spool_dir / "ballast"
    size = shutil.disk_usage(spool_dir).free - leave_free_bytes
    with open(path, "wb") as handle:
        handle.write(b"\x01" * max(size, 0))
    return path


def _stored_files(node: NodeService) -> list[Path]:
    return sorted(node.spool.incoming_dir.rglob("*.dcm"))


@pytest.mark.timeout(180)
def test_a_disk_filling_up_mid_write_answers_out_of_resources(tmpfs: Path, tmp_path: Path) -> None:
    node = _node(tmpfs, min_free_bytes=0)  # no watermark: the disk itself runs out
    try:
        size = _instances(tmp_path / "probe", 1)[0].stat().st_size
        ballast = _ballast(tmpfs, leave_free_bytes=int(2.5 * size))  # room for two, not three
        paths = _instances(tmp_path / "send", 4)
        result, elapsed_s = _storescu(node, paths)
        output = result.stdout + result.stderr
        statuses = _statuses(output)
        # Two stored; the third ran out of space mid-write. storescu stops after a refusal
        # for lack of resources (it releases the association), so the fourth is not sent.
        assert statuses == ["Success", "Success", "Refused: OutOfResources"], output
        assert "DIMSE timeout" not in output and "Association Aborted" not in output, output
        assert not list(node.spool.tmp_dir.iterdir()), "partial receive left in spool/tmp"
        assert len(_stored_files(node)) == 2
        for stored in _stored_files(node):  # what was acknowledged is whole
            assert len(dcmread(stored).PixelData) == ROWS * COLS * 2
        assert _echo(node).returncode == 0, "the node still answers C-ECHO"
        print(f"disk full mid-write: 3 C-STOREs answered and released in {elapsed_s:.2f} s")
        # Space freed: the refused instances are accepted when sent again.
        ballast.unlink()
        result, _ = _storescu(node, paths[2:])
        assert _statuses(result.stdout + result.stderr) == ["Success", "Success"], result.stderr
        assert len(_stored_files(node)) == 4
        assert not list(node.spool.tmp_dir.iterdir())
    finally:
        node.scp.stop()


@pytest.mark.timeout(180)
def test_below_the_watermark_storage_is_refused_and_echo_still_answers(tmpfs: Path,
                                                                      tmp_path: Path) -> None:
    watermark = 3 * 1024 * 1024
    node = _node(tmpfs, min_free_bytes=watermark)
    try:
        paths = _instances(tmp_path / "send", 3)
        result, _ = _storescu(node, paths[:1])
        assert _statuses(result.stdout + result.stderr) == ["Success"], result.stderr

        # An association opened while there was room, then the disk drops below the watermark.
        ae = RequestorAE(ae_title="STORESCU")
        ae.add_requested_context(MG, [EXPLICIT_VR_LITTLE_ENDIAN])
        assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="MAMMO_NODE")
        assert assoc.is_established
        ballast = _ballast(tmpfs, leave_free_bytes=watermark // 2)
        try:
            started = time.monotonic()
            status = assoc.send_c_store(dcmread(paths[1]))
            elapsed_s = time.monotonic() - started
            assert status.Status == 0xA700
            assert assoc.is_established, "the association stays usable"
        finally:
            assoc.release()
        assert not list(node.spool.tmp_dir.iterdir())
        print(f"C-STORE below the watermark on an open association: 0xA700 in {elapsed_s:.3f} s")

        # A new association proposing storage: rejected, transient, local limit exceeded.
        result, _ = _storescu(node, paths[1:2])
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "Association Rejected" in output, output
        assert "Rejected Transient" in output and "Local Limit Exceeded" in output, output
        assert "Service Provider (Presentation)" in output or "Presentation" in output, output
        # Verification alone is admitted: monitoring can tell a full node from a dead one.
        assert _echo(node).returncode == 0
        assert len(_stored_files(node)) == 1
        assert not list(node.spool.tmp_dir.iterdir())

        ballast.unlink()
        result, _ = _storescu(node, paths[1:])
        assert _statuses(result.stdout + result.stderr) == ["Success", "Success"], result.stderr
        assert len(_stored_files(node)) == 3
    finally:
        node.scp.stop()


@pytest.mark.timeout(120)
def test_an_instance_that_would_cross_the_watermark_is_refused(tmpfs: Path, tmp_path: Path) -> None:
    """Free space above the watermark when the data set starts, below it once received: 0xA700,
    and the file is removed, so the disk is back above the watermark for the next sender."""
    size = _instances(tmp_path / "probe", 1)[0].stat().st_size
    node = _node(tmpfs, min_free_bytes=2 * size)
    try:
        _ballast(tmpfs, leave_free_bytes=int(2.5 * size))
        result, _ = _storescu(node, _instances(tmp_path / "send", 2))
        statuses = _statuses(result.stdout + result.stderr)
        assert statuses == ["Refused: OutOfResources"], result.stdout
        assert not list(node.spool.tmp_dir.iterdir())
        assert _stored_files(node) == []
        assert shutil.disk_usage(tmpfs).free >= 2 * size
    finally:
        node.scp.stop()

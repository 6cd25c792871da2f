"""Receiving: admission, negotiation and C-STORE into the spool, with dcmtk as the modality.

The node runs in this process (non-blocking server) with a real socket on a free port; no
broker is needed until a run is published, so these tests check the spool directly.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.service import NodeService
from node.spool import hash_key
from tests.support.settings import make_settings
from tools.stack.make_study import make_study
from tools.stack.services import find_binary

pytestmark = [pytest.mark.integration, pytest.mark.requires_bin("storescu", "echoscu")]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeService]:
    service = NodeService(make_settings(
        tmp_path, listener=True,
        allowed_callers=[{"ae_title": "STORESCU", "host": "127.0.0.1"},
                         {"ae_title": "PINNED", "host": "127.0.0.2"}],
    ))
    service.scp.start()  # the listener only: tests drive the watcher by hand
    yield service
    service.scp.stop()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=60)


def _echo(node: NodeService, calling: str = "STORESCU", called: str = "MAMMO_NODE"
          ) -> subprocess.CompletedProcess[str]:
    return _run(find_binary("echoscu"), "-aet", calling, "-aec", called, "-to", "5",
                "127.0.0.1", str(node.settings.node.port))


def _store(node: NodeService, paths: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return _run(find_binary("storescu"), "-aet", "STORESCU", "-aec", "MAMMO_NODE", "-to", "10",
                *extra, "127.0.0.1", str(node.settings.node.port), *map(str, paths))


def test_allowed_caller_can_echo(node: NodeService) -> None:
    assert _echo(node).returncode == 0


def test_unknown_calling_ae_is_rejected(node: NodeService) -> None:
    result = _echo(node, calling="STRANGER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout


def test_allowed_ae_title_from_the_wrong_host_is_rejected(node: NodeService) -> None:
    result = _echo(node, calling="PINNED")  # allowed only from 127.0.0.2
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout


def test_wrong_called_ae_is_rejected(node: NodeService) -> None:
    result = _echo(node, called="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr + result.stdout


def test_four_views_land_in_the_spool_and_complete(node: NodeService, tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", rows=256, cols=208, seed=3)
    result = _store(node, paths)
    assert result.returncode == 0, result.stderr
    [study] = node.spool.incoming_studies()
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    assert study.study_uid == study_uid
    assert study.view_keys == {"R-CC", "L-CC", "R-MLO", "L-MLO"}
    folder = node.spool.incoming_dir / hash_key(study_uid)
    for path in paths:
        sop_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        stored = dcmread(folder / (hash_key(sop_uid) + ".dcm"))
        assert stored.PixelData == dcmread(path).PixelData
    assert not list(node.spool.tmp_dir.iterdir()), "no receive leftovers"
    # The association was released and all four views are in: the watcher claims it at once.
    deadline = time.monotonic() + 10
    while node.tracker.is_open(study.study_key) and time.monotonic() < deadline:
        time.sleep(0.05)
    node.watcher.tick()
    [run_id] = node.spool.runs("queued")
    info = json.loads((node.spool.state_dir("queued") / run_id / "run.json").read_text())
    assert info["completion_reason"] == "views_complete"
    assert info["instance_count"] == 4
    # The broker in these settings is not running: the run stays queued, unpublished, not lost.
    assert node.spool.unpublished_runs() == [run_id]


@pytest.mark.parametrize(("syntax", "flag"), [("j2k", "-xv"), ("rle", "-xr"), ("jpegls", "-xt")])
def test_compressed_studies_are_accepted(node: NodeService, tmp_path: Path, syntax: str,
                                         flag: str) -> None:
    paths = make_study(tmp_path / syntax, views=["L-CC"], rows=256, cols=208,
                       transfer_syntax=syntax, seed=4)
    result = _store(node, paths, flag)
    assert result.returncode == 0, result.stderr
    [study] = node.spool.incoming_studies()
    [entry] = study.instances
    assert entry.transfer_syntax_uid == str(dcmread(paths[0]).file_meta.TransferSyntaxUID)


def _ct_file(folder: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unknown_sop_class_is_refused_at_negotiation(node: NodeService, tmp_path: Path) -> None:
    result = _store(node, [_ct_file(tmp_path / "ct")])
    assert result.returncode != 0
    assert "No presentation context" in result.stderr + result.stdout or \
        "no acceptable presentation context" in (result.stderr + result.stdout).lower()
    assert node.spool.incoming_studies() == []


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"command_sop_uid": "9.9.9"}, 0xC001),  # dataset SOP Instance UID differs from command
        ({"StudyInstanceUID": "../x"}, 0xC001),
        ({"StudyInstanceUID": "/tmp/x"}, 0xC001),
        ({"SeriesInstanceUID": "1.2." + "3" * 70}, 0xC001),
        ({"SOPInstanceUID": "1.2.3\x00"}, 0xC001),
        ({"command_sop_class": "1.2.840.10008.5.1.4.1.1.1.2.1"}, 0xA900),
        ({"garbage": True}, 0xC000),
    ],
)
def test_bad_instances_get_a_precise_status_and_leave_nothing(node: NodeService, tmp_path: Path,
                                                              change: dict, status: int) -> None:
    [path] = make_study(tmp_path / "odd", views=["R-CC"], rows=64, cols=64, seed=5)
    ds = dcmread(path)
    command_sop_uid = change.pop("command_sop_uid", str(ds.SOPInstanceUID))
    command_sop_class = change.pop("command_sop_class", str(ds.SOPClassUID))
    received = node.spool.tmp_dir / "received.dcm"
    if change.pop("garbage", False):
        received.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    else:
        for keyword, value in change.items():
            setattr(ds, keyword, value)
        ds.save_as(received, enforce_file_format=True)
    got, reason, entry = node.scp.receiver.admit_instance(received, command_sop_uid,
                                                          command_sop_class, "a")
    assert got == status, reason
    assert entry is None and reason
    assert node.spool.incoming_studies() == []


def test_deflated_and_big_endian_are_never_accepted(node: NodeService) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    for syntax in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):  # Deflated, Big Endian
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.2", [syntax])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="MAMMO_NODE")
    try:
        assert assoc.is_established
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        assert accepted == ["1.2.840.10008.1.2.1"]
    finally:
        assoc.release()

"""The listener's audit trail: one JSON line per C-STORE decision, appended, never PHI.

The node is configured from a YAML file (so `audit.path` resolves as in production) and runs
in this process, listener only; dcmtk's storescu sends a good instance carrying recognisable
patient data, pynetdicom sends instances the node must refuse.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import _config

from node.audit import read_audit
from node.pynetdicom_internals import RequestorAE
from node.service import NodeService
from node.settings import load_settings
from tests.support.settings import write_config
from tools.stack.make_study import make_study
from tools.stack.services import find_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires_bin("storescu"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

MG = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
EXPLICIT = "1.2.840.10008.1.2.1"
PHI = ("CANARY^AUDIT", "AUDIT-ID-31337", "ACC-AUDIT-4242", "Canary Audit Hospital", "19700101")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeService]:
    config_path = write_config(tmp_path / "node.yaml", listener=True, node={"network_timeout_s": 20},
                               audit={"path": "audit/node-audit.jsonl"})
    service = NodeService(load_settings(config_path))
    service.scp.start()
    yield service
    service.scp.stop()


def _instance(folder: Path, seed: int) -> Path:
    [path] = make_study(folder, views=["L-CC"], rows=96, cols=80, seed=seed,
                        patient_name=PHI[0], patient_id=PHI[1], accession=PHI[2])
    ds = dcmread(path)
    ds.InstitutionName = PHI[3]
    ds.PatientBirthDate = PHI[4]
    ds.save_as(path)
    return path


def _storescu(node: NodeService, path: Path) -> None:
    result = subprocess.run(
        [find_binary("storescu"), "-aet", "STORESCU", "-aec", "MAMMO_NODE", "-to", "20",
         "127.0.0.1", str(node.settings.node.port), str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _send_raw(node: NodeService, paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = RequestorAE(ae_title="STORESCU")
    ae.add_requested_context(MG, [EXPLICIT])
    ae.add_requested_context(MG_FOR_PROCESSING, [EXPLICIT])
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="MAMMO_NODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def _hostile(folder: Path, seed: int, **changes: object) -> Path:
    path = _instance(folder, seed)
    ds = dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)  # file meta unchanged: the command says what the file meta says
    return path


def _sop_class_mismatch(folder: Path, seed: int) -> Path:
    path = _instance(folder, seed)
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
    ds.save_as(path)
    return path


@pytest.mark.timeout(120)
def test_each_decision_is_one_json_line_appended_without_phi(
    node: NodeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_path = node.settings.audit.path
    assert audit_path is not None and audit_path.parent.name == "audit"  # resolved from the YAML
    good = _instance(tmp_path / "good", seed=21)
    good_ds = dcmread(good, stop_before_pixels=True)
    _storescu(node, good)

    first = audit_path.read_bytes()
    records = read_audit(audit_path)
    received = [r for r in records if r["event"] == "instance_received"]
    assert len(received) == 1
    [record] = received
    assert record["source"] == "listener"
    assert record["status"] == "0x0000"
    assert record["sop_instance_uid"] == str(good_ds.SOPInstanceUID)
    assert record["study_uid"] == str(good_ds.StudyInstanceUID)
    assert record["sop_class_uid"] == MG
    assert record["association"]
    inode = os.stat(audit_path).st_ino

    refused = [
        _hostile(tmp_path / "uid", 22, StudyInstanceUID="../x"),
        _hostile(tmp_path / "rows", 23, Rows=97),
        _sop_class_mismatch(tmp_path / "class", 24),
    ]
    statuses = _send_raw(node, refused, monkeypatch)
    assert statuses == [0xC001, 0xC000, 0xA900]

    after = audit_path.read_bytes()
    assert after.startswith(first), "append-only: earlier records are never rewritten"
    assert os.stat(audit_path).st_ino == inode, "the same file, not a replacement"
    new_lines = after[len(first):].decode("utf-8").splitlines()
    new_records = [json.loads(line) for line in new_lines]  # every line is one JSON object
    rejected = [r for r in new_records if r["event"] == "instance_rejected"]
    assert [r["status"] for r in rejected] == ["0xC001", "0xC000", "0xA900"]
    assert [r["reason"] for r in rejected] == [
        "invalid_uid:StudyInstanceUID",
        "pixel_data_length_differs_from_image_attributes",
        "sop_class_differs_from_command",
    ]
    for r in rejected:
        assert r["source"] == "listener" and r["association"] and r["sop_instance_uid"]
    # No other event records an instance: exactly one line per C-STORE.
    assert sum(r["event"].startswith("instance_") for r in new_records) == len(refused)

    text = after.decode("utf-8")
    for line in text.splitlines():
        assert isinstance(json.loads(line), dict)
    for value in PHI:
        assert value not in text, f"PHI {value!r} in the audit file"

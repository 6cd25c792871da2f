"""PHI canary: a study with recognisable patient data goes through the whole node (Redis, Orthanc,
`mammo-node serve`, a worker); afterwards its patient data exists only in the received DICOM
files of the spool and in Orthanc.

Searched: every file the stack wrote (logs of node, worker and Redis, the audit trail, run.json,
record.json, manifest.jsonl, published.json, anything else that is not a received or result DICOM
file), and every Redis key and value, Celery messages decoded (kombu base64-encodes the body).
Redis is searched twice: while the run is queued with no worker (its message waiting in the
queue), and after the worker has scored and sent it.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom import dcmread

from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]

PATIENT_NAME = "CANARY^ZEBRA"
PATIENT_ID = "CANARY-ID-77431"
ACCESSION = "ACC-CANARY-5521"
INSTITUTION = "Narwhal Canary Clinic"
REFERRING_PHYSICIAN = "OKAPI^REFERRER"
# What must not appear, case-insensitively (the distinctive part of each value, so a name
# rendered as "Zebra Canary" or a PN split into components is still caught).
CANARY_TOKENS = ("ZEBRA", PATIENT_ID, ACCESSION, "NARWHAL", "OKAPI")


def _canary_study(folder: Path) -> list[Path]:
    paths = make_study(folder, rows=256, cols=208, seed=77, patient_name=PATIENT_NAME,
                       patient_id=PATIENT_ID, accession=ACCESSION)
    for path in paths:
        ds = dcmread(path)
        ds.InstitutionName = INSTITUTION
        ds.ReferringPhysicianName = REFERRING_PHYSICIAN
        ds.save_as(path)
    return paths


def _leaks(blob: bytes, where: str) -> list[str]:
    text = blob.decode("utf-8", "replace").upper()
    return [f"{token!r} in {where}" for token in CANARY_TOKENS if token.upper() in text]


def _expand(blob: bytes, depth: int = 0) -> list[bytes]:
    """The blob plus what is encoded inside it: JSON strings, base64 bodies (kombu messages)."""
    found = [blob]
    if depth > 4:
        return found
    try:
        document = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        document = None
    strings: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    for text in strings:
        if len(text) >= 8 and len(text) % 4 == 0:
            try:
                decoded = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                continue
            found += _expand(decoded, depth + 1)
    return found


def _redis_leaks(stack: NodeStack, must_contain: str | None = None) -> tuple[list[str], int]:
    """Leaks in every key and value of the broker's Redis; also the number of keys seen."""
    client = redis.Redis(host="127.0.0.1", port=stack.redis.port, password=stack.redis.password)
    leaks: list[str] = []
    everything = b""
    keys = 0
    for key in client.scan_iter(count=1000):
        keys += 1
        kind = client.type(key).decode()
        values: list[bytes]
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "hash":
            values = [part for pair in client.hgetall(key).items() for part in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = list(client.zrange(key, 0, -1))
        elif kind == "stream":
            values = [json.dumps(entry, default=repr).encode() for entry in client.xrange(key)]
        else:
            values = []
        values.append(client.dump(key) or b"")  # the raw serialisation too
        for value in [key, *values]:
            for piece in _expand(value):
                everything += piece
                leaks += _leaks(piece, f"redis key {key!r} ({kind})")
    client.close()
    if must_contain is not None:
        assert must_contain.encode() in everything, f"{must_contain} not found in Redis"
    return leaks, keys


def _file_leaks(stack: NodeStack) -> tuple[list[str], list[str]]:
    """Leaks in every file the stack wrote, except DICOM files and Orthanc's own storage."""
    orthanc_dir = stack.orthanc.directory
    leaks: list[str] = []
    searched: list[str] = []
    for path in sorted(stack.directory.rglob("*")):
        if not path.is_file() or orthanc_dir in path.parents:
            continue
        if path.suffix == ".dcm" and stack.spool_dir in path.parents:
            continue  # the received images themselves, and our results (copies of the patient)
        searched.append(str(path.relative_to(stack.directory)))
        leaks += _leaks(path.read_bytes(), str(path.relative_to(stack.directory)))
    return leaks, searched


@pytest.fixture
def canary_stack(tmp_path: Path) -> Iterator[NodeStack]:
    """A stack of its own (not the shared fault stack): clean logs and Redis, no worker yet."""
    node_stack = NodeStack(tmp_path / "stack", quiet_period_s=2, with_worker=False)
    try:
        node_stack.start()
        yield node_stack
    finally:
        node_stack.stop()


def _wait_for_published_run(stack: NodeStack, timeout_s: float = 60) -> str:
    queued = stack.spool_dir / "queued"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = [p for p in queued.glob("*/published.json")] if queued.is_dir() else []
        if runs:
            return runs[0].parent.name
        time.sleep(0.2)
    raise TimeoutError(f"no published run; node: {stack.log_tail('node')}")


@pytest.mark.timeout(480)
def test_patient_data_stays_in_dicom_files_and_the_pacs(canary_stack: NodeStack,
                                                        tmp_path: Path) -> None:
    stack = canary_stack
    paths = _canary_study(tmp_path / "study")
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    result = stack.storescu(paths)
    assert result.returncode == 0, result.stderr

    # Queued, no worker yet: the Celery message waits in Redis.
    run_id = _wait_for_published_run(stack)
    leaks, keys = _redis_leaks(stack, must_contain=run_id)
    assert keys > 0
    assert leaks == [], leaks

    stack.start_worker()
    stack.wait_for_results(study_uid, seg_count=4, timeout_s=300)
    record = stack.wait_for_record(study_uid, timeout_s=60)
    assert record["state"] == "done"

    # The canary really went through: it is in the spool's DICOM files and in Orthanc.
    stored = list(stack.spool_dir.rglob("*.dcm"))
    assert any(b"ZEBRA" in path.read_bytes() for path in stored)
    sources = stack.orthanc.find_instances(study_uid=study_uid)
    assert sources and PATIENT_ID in json.dumps(stack.orthanc.instance_tags(sources[0]))

    leaks, keys = _redis_leaks(stack)
    assert leaks == [], leaks
    leaks, searched = _file_leaks(stack)
    assert leaks == [], leaks
    for expected in ("node.log", "worker.log", "audit.jsonl", "record.json", "run.json",
                     "manifest.jsonl"):
        assert any(name.endswith(expected) for name in searched), f"{expected} was not searched"


def test_the_search_sees_through_celery_message_encoding() -> None:
    """The detector itself: a canary inside a kombu message (JSON, base64 body) is found."""
    body = base64.b64encode(json.dumps([["run-1"], {"name": PATIENT_NAME}, {}]).encode()).decode()
    message = json.dumps({"body": body, "content-encoding": "utf-8",
                          "properties": {"body_encoding": "base64"}}).encode()
    assert _leaks(message, "raw") == []  # invisible without decoding
    found = [leak for piece in _expand(message) for leak in _leaks(piece, "decoded")]
    assert found == ["'ZEBRA' in decoded"]

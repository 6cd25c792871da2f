"""Sending results: every object to every destination, retried, and a clear reason when it fails."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, evt

from node.errors import TransientError
from node.pynetdicom_internals import RequestorAE
from node.runs import (
    RECORD_NAME,
    InstanceEntry,
    SendResult,
    read_record,
    read_run_info,
    read_sent,
    write_run_info,
)
from node.scu import echo, send_files
from node.settings import Settings
from node.spool import Spool, hash_key
from pipelines.model import ViewPrediction
from pipelines.results import ModelIdentity
from pipelines.scoring import process_run, send_outputs
from tests.support.settings import make_settings
from tools.stack.make_study import make_study
from tools.stack.services import find_binary, free_port

pytestmark = [pytest.mark.integration, pytest.mark.requires_bin("storescp")]


def _two_destinations(tmp_path: Path, *destinations: tuple[str, str, int],
                      timeout_s: float) -> Settings:
    """Destinations (name, AE title, port) on this host, in this order; two quick attempts."""
    return make_settings(
        tmp_path,
        destinations=[{"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port,
                       "timeout_s": timeout_s} for name, ae_title, port in destinations],
        send={"attempts": 2, "backoff_s": 0.1, "backoff_max_s": 0.2})


def _sender_settings(tmp_path: Path, port: int, attempts: int = 2) -> Settings:
    """One archive on `port`, quick retries."""
    return make_settings(
        tmp_path,
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                       "port": port, "timeout_s": 5}],
        send={"attempts": attempts, "backoff_s": 0.1, "backoff_max_s": 0.2},
    )


def _start_storescp(ae_title: str, port: int, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """dcmtk's storescp writing into `out`, once it answers C-ECHO."""
    process = subprocess.Popen([find_binary("storescp"), "-aet", ae_title, "-od", str(out),
                                *extra, str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run([find_binary("echoscu"), "-aec", ae_title, "127.0.0.1", str(port)],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "storescp never answered C-ECHO"
        time.sleep(0.1)
    return process


@contextmanager
def _storescp_running(ae_title: str, port: int, out: Path, *extra: str) -> Iterator[None]:
    """A storescp (`_start_storescp`) for as long as the block runs."""
    process = _start_storescp(ae_title, port, out, *extra)
    try:
        yield
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    with _storescp_running("ARCHIVE", port, out, "+xa"):
        yield port, out


def test_every_object_reaches_the_destination(tmp_path: Path, storescp: tuple[int, Path]) -> None:
    port, out = storescp
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC"], rows=64, cols=48, seed=41)
    files += make_study(tmp_path / "j2k", views=["R-MLO"], rows=64, cols=48, seed=41,
                        transfer_syntax="j2k")
    sends, failure = send_outputs(_sender_settings(tmp_path, port), files)
    assert failure is None
    assert [s["ok"] for s in sends] == [True, True, True]
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    assert received == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


class _LateWakingCheckpoint(threading.Event):
    """An association reactor's pause checkpoint whose waiter, once woken from a real wait,
    runs `delay_s` late: the reactor thread scheduled late on a loaded host."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.set()
        self.delay_s = delay_s

    def wait(self, timeout: float | None = None) -> bool:
        blocked = not self.is_set()
        woken = super().wait(timeout)
        if blocked:
            time.sleep(self.delay_s)
        return woken


@pytest.mark.parametrize(("requestor", "replies_lost"), [(AE, True), (RequestorAE, False)],
                         ids=["stock pynetdicom", "the node's requestor"])
def test_a_reply_reaches_its_sender_however_late_the_reactor_runs(
        tmp_path: Path, storescp: tuple[int, Path], requestor: type[AE],
        replies_lost: bool) -> None:
    """Back-to-back C-STOREs on one association with the reactor woken late after each reply
    and the sender slow to read its next one. Stock pynetdicom's reactor takes that reply
    ("Received unexpected C-STORE service message") and the sender waits out its DIMSE timeout,
    though the PACS stored the object; the node's requestor leaves it to the sender."""
    port, out = storescp
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC", "R-MLO", "L-MLO"],
                       rows=32, cols=24, seed=43)
    datasets = [dcmread(path) for path in files]
    ae = requestor(ae_title="MAMMO_NODE")
    ae.dimse_timeout = 2
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
    assert assoc.is_established
    assoc._reactor_checkpoint = _LateWakingCheckpoint(0.1)
    send_msg = assoc.dimse.send_msg

    def send_then_stall(*args: object) -> None:
        send_msg(*args)
        time.sleep(0.4)  # the reply arrives meanwhile; the woken reactor polls the queue

    assoc.dimse.send_msg = send_then_stall  # type: ignore[method-assign]
    statuses = []
    for dataset in datasets:
        if not assoc.is_established:
            break
        statuses.append(getattr(assoc.send_c_store(dataset), "Status", None))
    if assoc.is_established:
        assoc.release()
    stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    answered = {str(d.SOPInstanceUID)
                for d, status in zip(datasets[:len(statuses)], statuses, strict=True)
                if status == 0}
    assert answered <= stored
    if replies_lost:  # the defect, so this test shows it is what the node's requestor mends
        assert answered < stored and None in statuses
    else:
        assert statuses == [0, 0, 0, 0] and answered == stored


def test_each_stored_object_is_journaled_and_a_journal_that_cannot_be_written_stops_nothing(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    from structlog.testing import capture_logs

    port, out = storescp
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC"], rows=64, cols=48, seed=44)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sends, failure = send_outputs(_sender_settings(tmp_path, port), files, journal=run_dir)
    assert failure is None
    assert read_sent(run_dir) == {("archive", uid): "0x0000" for uid in uids}
    with capture_logs() as logs:  # a full disk, a folder gone: the objects still go
        sends, failure = send_outputs(_sender_settings(tmp_path, port), files,
                                      journal=tmp_path / "gone")
    assert failure is None and [s["ok"] for s in sends] == [True, True]
    assert [(e["event"], e["destination"]) for e in logs
            if e["event"] == "send_journal_not_written"] == [("send_journal_not_written",
                                                               "archive")]


def test_unreachable_destination_fails_with_the_reason_after_the_last_attempt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=42)
    with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
        sends, failure = send_outputs(_sender_settings(tmp_path, free_port(), attempts=3), files)
    # pynetdicom's own error lines about the failed connect are not logged again beside ours.
    assert not [r for r in caplog.records
                if r.name.startswith("pynetdicom") and r.levelno >= logging.WARNING]
    captured = capsys.readouterr()
    retries = [line for line in (captured.out + captured.err).splitlines()
               if "send_retry_scheduled" in line]
    assert len(retries) == 2  # it backed off between the three attempts, doubling the wait
    assert re.search(r'retry_in_s"?[=:] ?0\.1\b', retries[0])
    assert re.search(r'retry_in_s"?[=:] ?0\.2\b', retries[1])
    # Each retry says why, as the run's failure will.
    assert all("None: no association: connection refused" in line for line in retries)
    assert failure == ("archive: 1 object(s) not stored after 3 attempts (status None: "
                       "no association: connection refused (nothing listens on the "
                       "destination's port))")
    sop_uid = str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    assert sends == [{"destination": "archive", "file": "R-CC.dcm", "sop_uid": sop_uid,
                      "status": None, "ok": False}]


def test_an_object_the_pacs_refuses_fails_at_once_with_the_reason_and_the_rest_are_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dcmtk `storescp` that takes uncompressed transfer syntaxes only (its default) refuses
    the presentation context of a JPEG 2000 object: that object is never offered, the objects
    it takes are stored on the same association, and the refused one alone is not retried (it
    would be refused again; beside objects worth a retry it goes again, as when the PACS of
    tests/faults/test_pacs_faults.py[out_of_resources], which takes no CAD SR, gives way to
    Orthanc). The failure says why and what to do."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen([find_binary("storescp"), "-aet", "ARCHIVE", "-od", str(out),
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        files = make_study(tmp_path / "objs", views=["R-CC", "L-CC"], rows=64, cols=48, seed=45)
        files += make_study(tmp_path / "j2k", views=["R-MLO"], rows=64, cols=48, seed=45,
                            transfer_syntax="j2k")
        deadline = time.monotonic() + 10
        while subprocess.run([find_binary("echoscu"), "-aec", "ARCHIVE", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "storescp never answered C-ECHO"
            time.sleep(0.1)
        sends, failure = send_outputs(_sender_settings(tmp_path, port, attempts=3), files)
        # Only objects it refuses: it accepts the association with no context (pynetdicom then
        # aborts it), and that is a refusal too, not an outage worth retrying.
        alone, alone_failure = send_outputs(_sender_settings(tmp_path, port, attempts=3),
                                            files[2:])
    finally:
        process.terminate()
        process.wait(10)
    reason = ("no presentation context accepted for Digital Mammography X-Ray Image Storage - "
              "For Presentation in JPEG 2000 Image Compression (Lossless Only)")
    assert failure == (f"archive: 1 object(s) refused by the destination ({reason}): have its "
                       "PACS accept them, or leave them out with its `objects` setting")
    assert [(s["file"], s["ok"], s.get("refused")) for s in sends] == [
        ("R-CC.dcm", True, None), ("L-CC.dcm", True, None), ("R-MLO.dcm", False, reason)]
    j2k_uid = str(dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
    assert sends[2]["sop_uid"] == j2k_uid and sends[2]["status"] is None
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    assert received == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                        for p in files[:2]}
    lines = capsys.readouterr()
    logged = lines.out + lines.err
    assert "send_retry_scheduled" not in logged  # nothing to retry: the rest were stored
    assert logged.count("send_refused_by_destination") == 2
    assert alone_failure == failure
    assert [(s["sop_uid"], s["ok"], s.get("refused")) for s in alone] == [(j2k_uid, False, reason)]
    # The run record keeps the reason; an object stored has no `refused` in the file.
    results = [SendResult.model_validate(s) for s in sends]
    assert "refused" not in json.loads(results[0].model_dump_json())
    assert json.loads(results[2].model_dump_json())["refused"] == reason


def test_an_object_failed_with_a_status_about_itself_is_not_sent_again(tmp_path: Path) -> None:
    """PS3.4 B.2.3: 0xA900 (the data set does not match its SOP class) and 0xCxxx (cannot
    understand) are about the object: the same bytes get the same answer, so it is sent once;
    0xA700 (out of resources) may pass later and is retried. The failure names each status in
    words."""
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC", "R-MLO", "L-MLO"], rows=64,
                       cols=48, seed=49)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    answers = dict(zip(uids, [0xA900, 0xC002, 0xA700, 0x0000], strict=True))
    calls: dict[str, int] = {}

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        calls[uid] = calls.get(uid, 0) + 1
        return answers[uid]

    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(str(dcmread(files[0], stop_before_pixels=True).SOPClassUID),
                             ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        sends, failure = send_outputs(_sender_settings(tmp_path, port, attempts=3), files)
    finally:
        server.shutdown()
    assert [calls[uid] for uid in uids] == [1, 1, 3, 1]
    assert [(s["status"], s["ok"]) for s in sends] == [
        ("0xA900", False), ("0xC002", False), ("0xA700", False), ("0x0000", True)]
    assert failure == (
        "archive: 2 object(s) failed with a status about the object itself (status 0xA900 Data "
        "Set Does Not Match SOP Class, 0xC002 Cannot Understand), not sent again: the "
        "destination's log says what it objects to; archive: 1 object(s) not stored after 3 "
        "attempts (status 0xA700 Refused: Out of Resources)")


@pytest.mark.timeout(120)
def test_a_pacs_that_aborts_mid_store_ends_the_attempt_without_waiting_out_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dcmtk's `storescp --abort-during` sends A-ABORT in the middle of the first C-STORE. The
    objects still to send go with the next attempt on a new association: on the aborted one
    each C-STORE would wait out the destination's whole timeout (300 s here, past this test's
    limit) for an answer that cannot come."""
    port = free_port()
    process = subprocess.Popen([find_binary("storescp"), "-aet", "ARCHIVE", "--abort-during",
                                "+xa", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        files = make_study(tmp_path / "objs", rows=64, cols=48, seed=44)
        settings = make_settings(
            tmp_path, destinations=[{"name": "archive", "ae_title": "ARCHIVE",
                                     "host": "127.0.0.1", "port": port, "timeout_s": 300}],
            send={"attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.2})
        deadline = time.monotonic() + 10
        while subprocess.run([find_binary("echoscu"), "-aec", "ARCHIVE", "127.0.0.1", str(port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "storescp never answered C-ECHO"
            time.sleep(0.1)
        sends, failure = send_outputs(settings, files)
    finally:
        process.terminate()
        process.wait(10)
    assert failure == ("archive: 4 object(s) not stored after 3 attempts (status None: the "
                       "association ended or went silent mid-send)")
    assert [s["status"] for s in sends] == [None] * 4
    lines = capsys.readouterr()
    lost = [line for line in (lines.out + lines.err).splitlines()
            if "send_association_lost" in line]
    assert len(lost) == 3  # once per attempt, none of the four answered
    assert all(re.search(r'answered"?[=:] ?0\b', line) for line in lost)


def test_a_pacs_that_rejects_the_association_is_retried_and_the_failure_says_how_it_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`storescp --refuse` rejects every association (permanent, service user, no reason): a
    PACS in maintenance may do that and then come back, so it is retried as an outage is, and
    the failure quotes the A-ASSOCIATE-RJ (the usual one in a new install: "calling AE title
    not recognised", the PACS does not know the node yet)."""
    port = free_port()
    process = subprocess.Popen([find_binary("storescp"), "-aet", "ARCHIVE", "--refuse",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10  # listening (a refusing peer answers no echo)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=47)
        settings = _sender_settings(tmp_path, port, attempts=2)
        with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
            sends, failure = send_outputs(settings, files)
        # The rejection is in the reason; pynetdicom's three error lines about it are not.
        assert not [r for r in caplog.records
                    if r.name.startswith("pynetdicom") and r.levelno >= logging.WARNING]
        with pytest.raises(TransientError, match="archive: association rejected: rejected "
                                                 "permanent, service user: no reason given"):
            echo(settings, settings.destinations[0])  # `mammo-node echo archive` says it too
    finally:
        process.terminate()
        process.wait(10)
    assert failure == ("archive: 1 object(s) not stored after 2 attempts (status None: "
                       "association rejected: rejected permanent, service user: no reason given)")
    assert [(s["ok"], s["status"], s.get("refused")) for s in sends] == [(False, None, None)]


A_ABORT_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # PS3.8 9.3.8: source 0, reason 0


def _serve(answer: Callable[[socket.socket], None], stop: threading.Event) -> int:
    """A TCP peer on a free port that reads each A-ASSOCIATE-RQ, then calls `answer` with the
    connection (closed after it), until `stop`."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)

    def serve() -> None:
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.recv(65536)
                    answer(conn)

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1])


def _peer(behaviour: str, stop: threading.Event) -> int:
    """A PACS that hangs, crashes, aborts or speaks something else."""

    def answer(conn: socket.socket) -> None:
        if behaviour == "abort":
            conn.sendall(A_ABORT_PDU)
        elif behaviour == "garbage":
            conn.sendall(b"\x99" * 16)
        elif behaviour == "silent":
            stop.wait(3)  # longer than the destination's 1 s timeout
        stop.wait(0.2)

    return _serve(answer, stop)


@pytest.mark.parametrize(("behaviour", "why"), [
    ("silent", "no answer to the association request within 1 s"),
    ("close", "the destination closed the connection without answering the association "
              "request"),
    ("abort", "the destination aborted the association request (A-ABORT)"),
    ("garbage", "the destination's answer broke the protocol (pdu_type_unknown)"),
])
def test_a_pacs_that_answers_no_association_request_is_named_for_what_it_did(
    tmp_path: Path, behaviour: str, why: str
) -> None:
    """Radiology IT reads the reason to know where to look: a PACS that hangs, drops the
    connection, aborts or is not a DICOM service at all each say so (`mammo-node echo` too)."""
    stop = threading.Event()
    try:
        port = _peer(behaviour, stop)
        settings = make_settings(tmp_path, destinations=[
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port,
             "timeout_s": 1}])
        files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=48)
        outcomes = send_files(settings, settings.destinations[0], files)
        assert [(o.status, o.unanswered) for o in outcomes] == [(None, f"no association: {why}")]
        with pytest.raises(TransientError) as raised:
            echo(settings, settings.destinations[0])
        assert str(raised.value) == f"destination archive: no association: {why}"
    finally:
        stop.set()


def test_a_hung_archive_does_not_hold_back_the_pacs(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    """Two destinations, the research archive listed first and hung: it takes the association
    request and answers nothing. The PACS gets its objects while the archive's first request is
    still unanswered (the hung peer holds it open until they are there, at most 20 s, then
    drops it): destinations are served side by side, not one after the other. The record keeps
    the configured order and the archive's reason."""
    port, out = storescp
    seen: list[bool] = []
    stop = threading.Event()

    def hang_until_the_pacs_has_them(conn: socket.socket) -> None:
        deadline = time.monotonic() + 20
        while not any(out.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(any(out.iterdir()))

    archive_port = _serve(hang_until_the_pacs_has_them, stop)
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC"], rows=64, cols=48, seed=50)
    settings = _two_destinations(tmp_path, ("research", "RESEARCH", archive_port),
                                 ("pacs", "ARCHIVE", port), timeout_s=30)
    try:
        sends, failure = send_outputs(settings, files)
    finally:
        stop.set()
    assert seen[0] is True  # the PACS had them while the archive's first request hung
    assert [(s["destination"], s["file"], s["ok"]) for s in sends] == [
        ("research", "R-CC.dcm", False), ("research", "L-CC.dcm", False),
        ("pacs", "R-CC.dcm", True), ("pacs", "L-CC.dcm", True)]
    assert failure == ("research: 2 object(s) not stored after 2 attempts (status None: no "
                       "association: the destination closed the connection without answering "
                       "the association request)")
    assert len(list(out.iterdir())) == 2


def test_a_send_that_fails_before_any_answer_still_names_each_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TLS destination's CA bundle was removed after the node started (a certificate
    rotation gone wrong): no association can even be tried, each attempt fails as a whole, and
    the record still says which objects were not stored, and why."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("")
    settings = make_settings(
        tmp_path,
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                       "port": free_port(), "timeout_s": 5, "tls": {"ca_file": str(ca_file)}}],
        send={"attempts": 2, "backoff_s": 0.1, "backoff_max_s": 0.2})
    ca_file.unlink()
    files = make_study(tmp_path / "objs", views=["R-CC", "L-CC"], rows=64, cols=48, seed=46)
    sends, failure = send_outputs(settings, files)
    assert failure == ("archive: 2 object(s) not stored after 2 attempts (status None: the "
                       f"sender failed: destinations[archive].tls.ca_file: cannot load {ca_file}: "
                       "No such file or directory)")
    assert [s["sop_uid"] for s in sends] == [
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    lines = capsys.readouterr()
    assert (lines.out + lines.err).count("send_attempt_failed") == 2


class _Fixed:
    """A transparent predictor: the scoring flow around the model is what is under test."""

    identity = ModelIdentity("fixed", "0", 0.5)
    last_timings_s: dict[str, float] = {}

    def predict(self, images: list[np.ndarray]) -> list[ViewPrediction]:
        return [ViewPrediction(0.25, np.zeros(np.shape(i), np.float32)) for i in images]


def _received_and_claimed(spool: Spool, paths: list[Path]) -> str:
    """The instances received into the spool and their study claimed (what the listener and
    the watcher do); the run id."""
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        received = spool.tmp_dir / "x.dcm"
        received.write_bytes(path.read_bytes())
        spool.add_instance(received, InstanceEntry(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID),
            str(ds.ImageLaterality), str(ds.ViewPosition),
            hash_key(str(ds.SOPInstanceUID)) + ".dcm", path.stat().st_size, time.time(), "a"))
    [study] = spool.incoming_studies()
    return spool.claim_study(study.study_key, "quiet_period")


def _queued_run(tmp_path: Path, settings: Settings) -> tuple[Spool, str]:
    spool = Spool(settings.spool.dir).ensure()
    paths = make_study(tmp_path / "study", views=["L-CC"], rows=64, cols=48, seed=43)
    return spool, _received_and_claimed(spool, paths)


def test_run_whose_results_cannot_be_delivered_is_parked_in_failed(tmp_path: Path) -> None:
    settings = _sender_settings(tmp_path, free_port(), attempts=2)
    spool, run_id = _queued_run(tmp_path, settings)
    assert process_run(settings, spool, run_id, _Fixed()) == "failed"
    record = json.loads((spool.state_dir("failed") / run_id / RECORD_NAME).read_text())
    assert record["error"].startswith("send: archive: 3 object(s) not stored after 2 attempts")
    assert len(record["outputs"]) == 3  # SR + SEG + CAD SR written and kept for a retry
    assert process_run(settings, spool, run_id, _Fixed()) is None  # a late duplicate: no-op


def test_a_retried_run_sends_only_what_an_earlier_attempt_did_not_store(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    """The PACS stored the results, the research archive was down: the run failed. After
    `runs retry`, with the archive back, only the archive gets them; the PACS (some answer a
    second copy with a failure) is not sent them again, and the record says so. A retried run
    that had succeeded is sent in full (its operator wants it resent)."""
    pacs_port, pacs_out = storescp
    archive_port, archive_out = free_port(), tmp_path / "archive"
    archive_out.mkdir()
    settings = _two_destinations(tmp_path, ("pacs", "ARCHIVE", pacs_port),
                                 ("research", "RESEARCH", archive_port), timeout_s=5)
    spool, run_id = _queued_run(tmp_path, settings)
    assert process_run(settings, spool, run_id, _Fixed()) == "failed"
    assert len(list(pacs_out.iterdir())) == 3  # SR, SEG, CAD SR
    for stored in pacs_out.iterdir():
        stored.unlink()  # to see whether the retry sends them again
    with _storescp_running("RESEARCH", archive_port, archive_out):
        spool.requeue_run(run_id)
        assert process_run(settings, spool, run_id, _Fixed()) == "done"
        record = json.loads((spool.state_dir("done") / run_id / RECORD_NAME).read_text())
        assert not any(pacs_out.iterdir())  # not sent again
        assert len(list(archive_out.iterdir())) == 3
        assert [(s["destination"], s["status"], s["ok"], s.get("earlier", False))
                for s in record["sends"]] == [("pacs", "0x0000", True, True)] * 3 + [
            ("research", "0x0000", True, False)] * 3
        spool.requeue_run(run_id)  # a run that succeeded: everything again
        assert process_run(settings, spool, run_id, _Fixed()) == "done"
        assert len(list(pacs_out.iterdir())) == 3


def _pacs_and_a_down_archive(tmp_path: Path, storescp: tuple[int, Path]
                             ) -> tuple[Settings, Path, int, Path]:
    """A PACS (the storescp) and a research archive that is down and retried for long:
    the settings, the PACS's folder, the archive's port and folder."""
    pacs_port, pacs_out = storescp
    archive_port, archive_out = free_port(), tmp_path / "archive"
    archive_out.mkdir()
    settings = _two_destinations(tmp_path, ("pacs", "ARCHIVE", pacs_port),
                                 ("research", "RESEARCH", archive_port), timeout_s=5)
    settings = settings.model_copy(update={"send": settings.send.model_copy(
        update={"attempts": 50, "backoff_s": 0.5, "backoff_max_s": 0.5})})  # retrying, long
    return settings, pacs_out, archive_port, archive_out


def _killed_once_the_pacs_stored(settings: Settings, spool: Spool, run_id: str) -> None:
    """The run processed in a forked worker, SIGKILLed (the OOM killer, a host going away) once
    its send journal says the PACS stored its three objects, while the archive is retried."""
    worker = multiprocessing.get_context("fork").Process(
        target=process_run, args=(settings, spool, run_id, _Fixed()), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while sum(d == "pacs" for d, _ in read_sent(spool.state_dir("work") / run_id)) < 3:
            assert worker.is_alive(), "the worker ended before the PACS had the results"
            assert time.monotonic() < deadline, "the PACS never had the results"
            time.sleep(0.05)
    finally:
        os.kill(worker.pid or 0, signal.SIGKILL)
        worker.join(10)


def test_a_worker_killed_mid_send_does_not_send_the_pacs_its_results_again(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    """The PACS stored the results, the research archive was down and being retried when the
    worker was SIGKILLed (the OOM killer, a host going away). The next attempt of the run (a
    new worker taking it from work/, as after a Celery redelivery or the reconciler) sends the
    archive everything and the PACS nothing: the send journal said what it had stored."""
    settings, pacs_out, archive_port, archive_out = _pacs_and_a_down_archive(tmp_path, storescp)
    spool, run_id = _queued_run(tmp_path, settings)
    _killed_once_the_pacs_stored(settings, spool, run_id)
    assert spool.runs("work") == [run_id]  # left where the killed worker held it
    assert len(list(pacs_out.iterdir())) == 3  # SR, SEG, CAD SR
    for stored in pacs_out.iterdir():
        stored.unlink()  # to see whether the next attempt sends them again
    with _storescp_running("RESEARCH", archive_port, archive_out):
        assert process_run(settings, spool, run_id, _Fixed()) == "done"
    record = json.loads((spool.state_dir("done") / run_id / RECORD_NAME).read_text())
    assert record["attempts"] == 2
    assert not any(pacs_out.iterdir())  # not sent again
    assert len(list(archive_out.iterdir())) == 3
    assert [(s["destination"], s["status"], s["ok"], s.get("earlier", False))
            for s in record["sends"]] == [("pacs", "0x0000", True, True)] * 3 + [
        ("research", "0x0000", True, False)] * 3


class _LateImageWhileScoring(_Fixed):
    """Scores like _Fixed; while it scores, the study's late image is received and claimed as a
    later run, which supersedes the run being scored."""

    def __init__(self, arrive: Callable[[], str]) -> None:
        self.arrive = arrive
        self.later: str | None = None

    def predict(self, images: list[np.ndarray]) -> list[ViewPrediction]:
        if self.later is None:
            self.later = self.arrive()
        return super().predict(images)


def _stored(out: Path) -> dict[str, Any]:
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in out.iterdir())}


def _predecessors(report: Any) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID)
            for study in report.get("PredecessorDocumentsSequence", [])
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence]


def test_a_run_superseded_while_it_was_scored_sends_nothing_and_its_successor_reports(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    """R-CC arrives while the study's L-CC is being scored: the watcher claims it as a later run
    that takes over L-CC and supersedes the run being scored. That run's report, sent now,
    would reach the PACS after the later one and say nothing of it: it is written and kept, not
    sent. The later run sends the report of both images, with no predecessor to name."""
    port, out = storescp
    settings = _sender_settings(tmp_path, port)
    spool = Spool(settings.spool.dir).ensure()
    first_view, late_view = make_study(tmp_path / "study", views=["L-CC", "R-CC"], rows=64,
                                       cols=48, seed=44)
    first = _received_and_claimed(spool, [first_view])
    predictor = _LateImageWhileScoring(lambda: _received_and_claimed(spool, [late_view]))
    assert process_run(settings, spool, first, predictor) == "done"
    later = predictor.later
    record = read_record(spool.state_dir("done") / first)
    assert record is not None and record.superseded_by == later
    assert record.not_sent == f"superseded by run {later} before sending"
    assert record.sends == () and len(record.outputs or ()) == 3  # SR, SEG, CAD SR: kept
    assert not any(out.iterdir())
    assert later is not None and process_run(settings, spool, later, _Fixed()) == "done"
    successor = read_record(spool.state_dir("done") / later)
    assert successor is not None and successor.supersedes == (first,)
    stored = _stored(out)
    assert set(stored) == {o.sop_uid for o in successor.outputs or ()}  # SR, 2 SEGs, CAD SR
    assert all(_predecessors(report) == [] for report in stored.values())


def test_a_run_superseded_while_its_pacs_is_down_stops_retrying_and_sends_nothing_later(
        tmp_path: Path) -> None:
    """The PACS is down and the run's send is being retried when the study's late image arrives:
    the later run takes over, and the retrying run stops at its next retry instead of storing
    its report once the PACS is back (after the later one's, unnamed by it)."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    settings = _sender_settings(tmp_path, port, attempts=100)
    settings = settings.model_copy(update={"send": settings.send.model_copy(
        update={"backoff_s": 0.3, "backoff_max_s": 0.3})})  # 30 s of retries
    spool = Spool(settings.spool.dir).ensure()
    first_view, late_view = make_study(tmp_path / "study", views=["L-CC", "R-CC"], rows=64,
                                       cols=48, seed=46)
    first = _received_and_claimed(spool, [first_view])
    outcome: list[str | None] = []
    worker = threading.Thread(target=lambda: outcome.append(
        process_run(settings, spool, first, _Fixed())))
    worker.start()
    deadline = time.monotonic() + 30
    while not (spool.state_dir("work") / first / "outputs").is_dir():
        assert time.monotonic() < deadline, "the run never got to sending"
        time.sleep(0.05)
    time.sleep(0.5)  # a first attempt failed: retrying
    later = _received_and_claimed(spool, [late_view])
    worker.join(10)
    assert not worker.is_alive(), "the superseded run kept retrying"
    assert outcome == ["done"]
    record = read_record(spool.state_dir("done") / first)
    assert record is not None and record.sends == ()
    assert record.not_sent == (f"superseded by run {later} while sending: what a destination "
                               "had not stored by then was not sent to it")
    with _storescp_running("ARCHIVE", port, out):
        assert process_run(settings, spool, later, _Fixed()) == "done"
    successor = read_record(spool.state_dir("done") / later)
    assert successor is not None
    stored = _stored(out)
    assert set(stored) == {o.sop_uid for o in successor.outputs or ()}
    assert all(_predecessors(report) == [] for report in stored.values())


def test_a_run_killed_mid_send_then_superseded_is_named_by_its_successor_and_not_resent(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    """The worker sending L-CC's results is SIGKILLed after the PACS stored them (the archive
    down). R-CC arrives: the later run supersedes the killed one, which has no record yet. Its
    reports name the killed run's as their predecessors (its send journal says the PACS has
    them); the killed run's next attempt sends nothing and records what its first one stored."""
    settings, pacs_out, archive_port, archive_out = _pacs_and_a_down_archive(tmp_path, storescp)
    spool = Spool(settings.spool.dir).ensure()
    first_view, late_view = make_study(tmp_path / "study", views=["L-CC", "R-CC"], rows=64,
                                       cols=48, seed=45)
    first = _received_and_claimed(spool, [first_view])
    _killed_once_the_pacs_stored(settings, spool, first)
    first_reports = {uid for uid, ds in _stored(pacs_out).items()
                     if ds.Modality == "SR"}
    assert len(first_reports) == 2  # SR and CAD SR
    later = _received_and_claimed(spool, [late_view])
    with _storescp_running("RESEARCH", archive_port, archive_out):
        assert process_run(settings, spool, later, _Fixed()) == "done"
        reports = {uid: ds for uid, ds in _stored(pacs_out).items()
                   if ds.Modality == "SR" and uid not in first_reports}
        assert len(reports) == 2
        assert sorted(p for ds in reports.values() for p in _predecessors(ds)) == sorted(
            first_reports)  # the SR names the SR, the CAD SR the CAD SR
        for stored in pacs_out.iterdir():
            stored.unlink()  # to see whether the killed run's next attempt sends anything
        for stored in archive_out.iterdir():
            stored.unlink()
        assert process_run(settings, spool, first, _Fixed()) == "done"
    assert not any(pacs_out.iterdir()) and not any(archive_out.iterdir())
    record = read_record(spool.state_dir("done") / first)
    assert record is not None and record.not_sent == f"superseded by run {later} before sending"
    assert sorted((s.destination, s.file, s.ok, s.earlier) for s in record.sends or ()) == sorted(
        ("pacs", Path(o.file).name, True, True) for o in record.outputs or ())
    assert len(record.outputs or ()) == 3  # SR, SEG, CAD SR: read back from the published files


def test_run_that_keeps_killing_workers_is_given_up(tmp_path: Path) -> None:
    settings = _sender_settings(tmp_path, free_port())
    spool, run_id = _queued_run(tmp_path, settings)
    run_dir = spool.state_dir("queued") / run_id
    info = read_run_info(run_dir)
    assert info is not None  # that many deliveries died mid-run:
    write_run_info(run_dir, info.model_copy(update={"attempts": settings.scoring.max_attempts}))
    assert process_run(settings, spool, run_id, _Fixed()) == "failed"
    record = json.loads((spool.state_dir("failed") / run_id / RECORD_NAME).read_text())
    assert record["error"] == f"input: gave up after {settings.scoring.max_attempts} attempts " \
                              "that did not finish"

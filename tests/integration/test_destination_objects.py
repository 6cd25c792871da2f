"""Each destination gets the objects it asks for (`destinations[].objects`), through the real
sender to two dcmtk storescp archives, and the run record says what went where."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from node.errors import ConfigError
from node.runs import RECORD_NAME, InstanceEntry, read_sent
from node.settings import Settings
from node.spool import Spool, hash_key
from node.vocabulary import COMPREHENSIVE_3D_SR, MAMMOGRAPHY_CAD_SR, SEGMENTATION
from pipelines.model import ViewPrediction
from pipelines.results import ModelIdentity
from pipelines.scoring import process_run, send_outputs, wanted_objects
from tests.support.settings import config_data, make_settings, write_config
from tools.stack.make_study import make_study
from tools.stack.services import OrthancService, find_binary, free_port

ROWS, COLUMNS = 64, 48


class _OneRegion:
    """A transparent predictor whose heatmap has one region above the operating point, so every
    kind of object (SR marks, binary SEG, CAD SR finding) has something to carry."""

    identity = ModelIdentity("fixed", "0", 0.5)
    last_timings_s: dict[str, float] = {}

    def predict(self, images: list[np.ndarray]) -> list[ViewPrediction]:
        predictions = []
        for image in images:
            heatmap = np.zeros(np.shape(image), np.float32)
            heatmap[20:32, 10:22] = 0.9
            predictions.append(ViewPrediction(0.9, heatmap))
        return predictions


def _destination(name: str, port: int, objects: list[str] | None) -> dict[str, object]:
    entry: dict[str, object] = {"name": name, "ae_title": name.upper(), "host": "127.0.0.1",
                                "port": port, "timeout_s": 5}
    if objects is not None:
        entry["objects"] = objects
    return entry


def _storescp(ae_title: str, out: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    out.mkdir(parents=True)
    process = subprocess.Popen([find_binary("storescp"), "-aet", ae_title, "-od", str(out), "+xa",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run([find_binary("echoscu"), "-aec", ae_title, "127.0.0.1", str(port)],
                               capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(0.1)
    return port, process


@pytest.fixture
def archives(tmp_path: Path) -> Iterator[dict[str, tuple[int, Path]]]:
    """Two storescp archives: "pacs" and "workstation"."""
    started = {}
    processes = []
    try:
        for name in ("pacs", "workstation"):
            port, process = _storescp(name.upper(), tmp_path / f"received-{name}")
            processes.append(process)
            started[name] = (port, tmp_path / f"received-{name}")
        yield started
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def _echo(tmp_path: Path, name: str, **config: Any) -> subprocess.CompletedProcess[str]:
    path = write_config(tmp_path / "echo.yaml", **config)
    return subprocess.run([sys.executable, "-m", "node.cli", "echo", name, "--config", str(path)],
                          capture_output=True, text=True, check=False, timeout=60)


def _queued_run(tmp_path: Path, settings: Settings) -> tuple[Spool, str]:
    spool = Spool(settings.spool.dir).ensure()
    for path in make_study(tmp_path / "study", views=["L-CC", "L-MLO"], rows=ROWS, cols=COLUMNS,
                           seed=47):
        ds = dcmread(path, stop_before_pixels=True)
        received = spool.tmp_dir / "x.dcm"
        received.write_bytes(path.read_bytes())
        spool.add_instance(received, InstanceEntry(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID), "L", str(ds.ViewPosition),
            hash_key(str(ds.SOPInstanceUID)) + ".dcm", path.stat().st_size, time.time(), "a"))
    [study] = spool.incoming_studies()
    return spool, spool.claim_study(study.study_key, "quiet_period")


def _received_classes(folder: Path) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in folder.iterdir())


@pytest.mark.integration
@pytest.mark.requires_bin("storescp", "echoscu")
def test_two_destinations_get_different_objects(
        tmp_path: Path, archives: dict[str, tuple[int, Path]]) -> None:
    (pacs_port, pacs_dir), (station_port, station_dir) = archives["pacs"], archives["workstation"]
    settings = make_settings(
        tmp_path,
        destinations=[_destination("pacs", pacs_port, ["sr", "seg"]),
                      _destination("workstation", station_port, ["cad_sr"])],
        send={"attempts": 1, "backoff_s": 0.1, "backoff_max_s": 0.1},
    )
    spool, run_id = _queued_run(tmp_path, settings)
    assert process_run(settings, spool, run_id, _OneRegion()) == "done"

    pacs = _received_classes(pacs_dir)
    assert pacs.count(str(COMPREHENSIVE_3D_SR)) == 1
    assert pacs.count(str(SEGMENTATION)) >= 1  # the binary SEGs of the two views
    assert set(pacs) == {str(COMPREHENSIVE_3D_SR), str(SEGMENTATION)}
    assert _received_classes(station_dir) == [str(MAMMOGRAPHY_CAD_SR)]

    record = json.loads((spool.state_dir("done") / run_id / RECORD_NAME).read_text())
    kinds = {o["file"].rsplit("/", 1)[-1]: o["kind"] for o in record["outputs"]}
    assert "cad_sr" in kinds.values()
    sent = {(s["destination"], kinds[s["file"]]) for s in record["sends"] if s["ok"]}
    assert sent == {("pacs", "sr"), ("pacs", "seg"), ("workstation", "cad_sr")}
    assert len(record["sends"]) == len(pacs) + 1  # nothing tried where it was not wanted


def test_kinds_no_destination_wants_are_not_written(tmp_path: Path) -> None:
    only_reports = make_settings(tmp_path, destinations=[_destination("pacs", 104, ["sr"]),
                                                         _destination("ws", 105, ["cad_sr"])])
    assert wanted_objects(only_reports) == {"sr", "cad_sr"}
    everything = make_settings(tmp_path, destinations=[_destination("pacs", 104, None)])
    assert wanted_objects(everything) == {"sr", "cad_sr", "seg", "sc"}
    assert everything.destinations[0].wants("cad_sr")


@pytest.mark.parametrize(("objects", "message"), [
    (["sr", "pdf"], "destinations.0.objects.1"),  # not a kind of object we write
    ([], "destinations.0.objects"),  # nothing at all: leave the destination out instead
    (["sc"], "does not write: ['sc']"),  # the overlay is opt-in (outputs.sc.enabled)
])
def test_objects_are_checked_when_the_config_loads(tmp_path: Path, objects: list[str],
                                                   message: str) -> None:
    from node.settings import parse_settings

    data = config_data(tmp_path, destinations=[_destination("pacs", 104, objects)])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_settings(data, "node.yaml")


@pytest.mark.integration
@pytest.mark.slow
def test_stow_rs_destination_gets_its_objects_exactly_once(
        tmp_path: Path, orthanc_factory: Callable[..., OrthancService]) -> None:
    """A DICOMweb destination (Orthanc's DICOMweb plugin) through the same run as C-STORE ones."""
    orthanc = orthanc_factory(dicomweb=True)
    settings = make_settings(
        tmp_path,
        dicomweb_destinations=[{"name": "web", "url": orthanc.dicomweb_url, "timeout_s": 10,
                                "objects": ["sr", "cad_sr"]}],
        send={"attempts": 1, "backoff_s": 0.1, "backoff_max_s": 0.1},
    )
    # `mammo-node echo web` checks it as C-ECHO checks a PACS: a QIDO-RS query, HTTP 200
    echoed = _echo(tmp_path, "web", dicomweb_destinations=[
        {"name": "web", "url": orthanc.dicomweb_url, "timeout_s": 10}])
    assert echoed.returncode == 0, echoed.stderr
    assert echoed.stdout.strip() == f"QIDO-RS web ({orthanc.dicomweb_url}): HTTP 200"
    spool, run_id = _queued_run(tmp_path, settings)
    assert process_run(settings, spool, run_id, _OneRegion()) == "done"
    run_dir = spool.state_dir("done") / run_id
    record = json.loads((run_dir / RECORD_NAME).read_text())
    assert {(s["destination"], s["status"]) for s in record["sends"]} == {("web", "0x0000")}
    sent = [o for o in record["outputs"] if o["kind"] in ("sr", "cad_sr")]
    assert len(record["sends"]) == len(sent) == 2
    stored = {orthanc.instance_tags(i)["SOPClassUID"] for i in orthanc.instances()}
    assert stored == {str(COMPREHENSIVE_3D_SR), str(MAMMOGRAPHY_CAD_SR)}
    # each object STOW-RS stored is in the run's send journal, as for C-STORE
    assert read_sent(run_dir) == {("web", o["sop_uid"]): "0x0000" for o in sent}

    # Sent again (a run retried after a crash): the same UIDs, so still one copy of each.
    sends, failure = send_outputs(settings, [run_dir / o["file"] for o in sent],
                                  [o["kind"] for o in sent])
    assert failure is None and all(s["ok"] for s in sends)
    assert len(orthanc.instances()) == 2


@pytest.mark.integration
def test_unreachable_stow_rs_destination_parks_the_run_in_failed(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        dicomweb_destinations=[{"name": "web", "url": f"http://127.0.0.1:{free_port()}/dicom-web",
                                "timeout_s": 2, "objects": ["sr"]}],
        send={"attempts": 2, "backoff_s": 0.1, "backoff_max_s": 0.1},
    )
    spool, run_id = _queued_run(tmp_path, settings)
    assert process_run(settings, spool, run_id, _OneRegion()) == "failed"
    record = json.loads((spool.state_dir("failed") / run_id / RECORD_NAME).read_text())
    assert record["error"] == ("send: web: 1 object(s) not stored after 2 attempts "
                               "(status None: no connection)")
    assert [o["kind"] for o in record["outputs"]] == ["sr"]  # kept for a resend


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that turns every request away: the token is wrong or missing."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._turn_away()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._turn_away()

    def _turn_away(self) -> None:
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:  # quiet
        return


@pytest.mark.integration
def test_a_stow_rs_destination_that_turns_the_node_away_fails_with_the_http_status(
        tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = make_settings(
            tmp_path,
            dicomweb_destinations=[{"name": "web", "timeout_s": 5,
                                    "url": f"http://127.0.0.1:{server.server_port}/dicom-web"}],
            send={"attempts": 2, "backoff_s": 0.1, "backoff_max_s": 0.1})
        files = make_study(tmp_path / "objs", views=["R-CC"], rows=64, cols=48, seed=48)
        sends, failure = send_outputs(settings, files)
        # A password in the URL stays off the terminal.
        url = f"http://user:secret@127.0.0.1:{server.server_port}/dicom-web"
        echoed = _echo(tmp_path, "web", dicomweb_destinations=[{"name": "web", "url": url}])
    finally:
        server.shutdown()
        server.server_close()
    assert failure == "web: 1 object(s) not stored after 2 attempts (status None: HTTP 401)"
    assert [(s["ok"], s["status"]) for s in sends] == [(False, None)]
    assert echoed.returncode == 1
    assert echoed.stdout.strip() == (
        f"QIDO-RS web (http://127.0.0.1:{server.server_port}/dicom-web): HTTP 401 (the token: "
        "its environment variable, or the server's users)")
    assert "secret" not in echoed.stdout + echoed.stderr

"""The local service launcher (tools/stack/services.py) brings up real Redis and Orthanc and stops them."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import redis
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from redis.backoff import NoBackoff
from redis.retry import Retry

from tools.stack import services

pytestmark = pytest.mark.integration

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def make_mg_file(path: Path, study_uid: str | None = None) -> pydicom.Dataset:
    """A tiny (16 x 16) but well-formed Digital Mammography For Presentation instance."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "STACK-TEST"
    ds.PatientName = "Stack^Test"
    ds.Modality = "MG"
    ds.ImageLaterality = "R"
    ds.ViewPosition = "CC"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_redis_requires_its_password(redis_service: services.RedisService) -> None:
    assert redis.Redis.from_url(redis_service.url).ping() is True
    assert redis_service.ping() == "+PONG"
    assert redis_service.ping(password="").startswith("-NOAUTH")

    # redis-py retries a failed AUTH 3 times with backoff (~4 s) unless told not to
    no_retry = Retry(NoBackoff(), 0)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_service.port, retry=no_retry).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            host="127.0.0.1", port=redis_service.port, password="wrong", retry=no_retry
        ).ping()

    port = redis_service.port
    assert redis_service.stop() == 0
    assert not redis_service.running
    assert not port_open(port)


def test_redis_with_appendonly_keeps_data_across_restart(redis_factory) -> None:
    service = redis_factory(appendonly=True)
    client = redis.Redis.from_url(service.url)
    client.set("spool:doorbell", "1")
    port, url = service.port, service.url

    service.restart()

    assert (service.port, service.url) == (port, url)
    assert redis.Redis.from_url(service.url).get("spool:doorbell") == b"1"
    assert (service.directory / "appendonlydir").is_dir()


def test_orthanc_upload_echo_store_and_clean_stop(
    orthanc_factory, tmp_path: Path, echoscu: str, storescu: str, storescp: str
) -> None:
    node_port = services.free_port()
    orthanc = orthanc_factory(modalities={"MAMMO_NODE": ["MAMMO_NODE", "127.0.0.1", node_port]})
    assert orthanc.system()["DicomAet"] == "ORTHANC"
    assert orthanc.instances() == []

    # REST upload
    source = make_mg_file(tmp_path / "mg.dcm")
    answer = orthanc.upload(tmp_path / "mg.dcm")
    assert answer["Status"] == "Success"
    (instance_id,) = orthanc.wait_for_instances(1, timeout_s=10)
    assert instance_id == answer["ID"]
    assert orthanc.get_instance_file(instance_id) == (tmp_path / "mg.dcm").read_bytes()
    assert orthanc.instance_tags(instance_id)["SOPInstanceUID"] == source.SOPInstanceUID
    assert orthanc.find_instances(sop_class_uid=MG_FOR_PRESENTATION) == [instance_id]
    assert orthanc.find_instances(sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34") == []

    # C-ECHO with dcmtk: accepted when called by its AE title, rejected otherwise
    echo = [echoscu, "-to", "10", "-aet", "MAMMO_NODE", "127.0.0.1", str(orthanc.dicom_port)]
    assert subprocess.run([*echo, "-aec", "ORTHANC"], capture_output=True).returncode == 0
    assert subprocess.run([*echo, "-aec", "SOMEONE"], capture_output=True).returncode != 0

    # C-STORE into Orthanc: accepted from the known modality only
    second = make_mg_file(tmp_path / "mg2.dcm", study_uid=source.StudyInstanceUID)
    store = [storescu, "-to", "10", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port)]
    stranger = subprocess.run(
        [*store, "-aet", "STRANGER", tmp_path / "mg2.dcm"], capture_output=True, text=True
    )
    assert orthanc.find_instances(sop_uid=second.SOPInstanceUID) == [], stranger.stderr
    known = subprocess.run(
        [*store, "-aet", "MAMMO_NODE", tmp_path / "mg2.dcm"], capture_output=True, text=True
    )
    assert known.returncode == 0, known.stderr
    orthanc.wait_for_instances(2, timeout_s=10)
    assert len(orthanc.find_instances(study_uid=source.StudyInstanceUID)) == 2

    # Orthanc pushes to the configured modality (here dcmtk's storescp stands in for the node)
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        [storescp, "-aet", "MAMMO_NODE", "-od", str(received), str(node_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open(node_port):
            assert scp.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        result = orthanc.store_to_modality("MAMMO_NODE", instance_id)
        assert result["InstancesCount"] == 1 and result["FailedInstancesCount"] == 0
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    (stored,) = received.iterdir()
    assert pydicom.dcmread(stored).SOPInstanceUID == source.SOPInstanceUID

    # A store to a modality that is down is an error, not a hang
    with pytest.raises(services.OrthancError):
        orthanc.store_to_modality("MAMMO_NODE", instance_id, timeout_s=60)

    dicom_port, http_port = orthanc.dicom_port, orthanc.http_port
    assert orthanc.stop() == 0
    assert not port_open(dicom_port) and not port_open(http_port)
    assert "Orthanc has stopped" in orthanc.log_tail()


def test_orthanc_start_failure_reports_the_log(tmp_path: Path) -> None:
    services.find_binary("Orthanc")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        service = services.OrthancService(tmp_path / "o", dicom_port=taken)
        with pytest.raises(services.ServiceError, match="exited with status") as failure:
            service.start()
    assert "Orthanc version" in str(failure.value)
    assert not service.running

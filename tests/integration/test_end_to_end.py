"""End to end on real parts: Redis, Orthanc as the PACS, `mammo-node serve`, a Celery worker.

The main path is the hospital's: the study is stored in Orthanc (the PACS) first, and Orthanc
sends it to the node; dcmtk's storescu sends the studies whose transfer syntax or content is the
point of the test. The SR and the SEGs must arrive in Orthanc beside the images, re-read
cleanly, carry the scores of the run record, reference the source images, and pass dciodvfy.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.seg import read_seg_regions
from pipelines.sr import read_sr_scores
from tests.support.dciodvfy import run_dciodvfy
from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, SEG_SOP_CLASS, NodeStack
from tools.stack.services import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server", "dciodvfy"),
]

ROWS, COLS = 512, 416


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    node_stack = NodeStack(tmp_path_factory.mktemp("e2e"), quiet_period_s=3)
    node_stack.redis.persist = True
    node_stack.orthanc.persist = True
    try:
        node_stack.start()
        yield node_stack
    finally:
        node_stack.stop()


def _study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _fetch(stack: NodeStack, orthanc_id: str, tmp_path: Path) -> tuple[Path, object]:
    data = stack.orthanc.get_instance_file(orthanc_id)
    path = tmp_path / f"{orthanc_id}.dcm"
    path.write_bytes(data)
    return path, dcmread(io.BytesIO(data))


def test_screening_study_scored_and_results_stored_in_pacs(stack: NodeStack, tmp_path: Path
                                                           ) -> None:
    paths = make_study(tmp_path / "study", rows=ROWS, cols=COLS, seed=101, lesions=["L-MLO"],
                       patient_name="CANARY^JANE", patient_id="PID-CANARY-7731",
                       accession="ACC-CANARY-5520")
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    # The hospital flow: the modality stores the study in the PACS, the PACS sends it to the node
    orthanc_study = stack.send_through_pacs(paths)
    study_uid = _study_uid(paths[0])
    ids = stack.wait_for_results(study_uid, seg_count=4)
    record = stack.wait_for_record(study_uid)
    assert record["state"] == "done"
    assert record["completion_reason"] == "views_complete"
    assert all(send["ok"] for send in record["sends"])

    # The SR: re-read with highdicom and with our reader; the scores are the run's scores.
    [sr_id] = ids["sr"]
    sr_path, sr = _fetch(stack, sr_id, tmp_path)
    evidence = hd.sr.srread(sr_path).get_evidence(current_procedure_only=True)
    scores = read_sr_scores(sr)
    assert scores["views"] == pytest.approx(record["scores"]["views"], abs=1e-6)
    assert scores["breasts"] == pytest.approx(record["scores"]["breasts"], abs=1e-6)
    assert scores["exam"] == pytest.approx(record["scores"]["exam"], abs=1e-6)
    assert scores["exam"] == max(scores["breasts"].values()) == max(scores["views"].values())
    assert scores["missing_views"] == []
    assert sr.StudyInstanceUID == study_uid
    assert set(scores["views_by_sop_uid"]) == set(sources)  # each score names its image
    referenced = {str(sop_uid): str(sop_class) for _, _, sop_uid, sop_class in evidence}
    assert {uid for uid, cls in referenced.items() if cls != SEG_SOP_CLASS} == set(sources)
    assert sorted(scores["seg_sop_uids"]) == sorted(
        uid for uid, cls in referenced.items() if cls == SEG_SOP_CLASS)
    # each view the run flagged outside the bundle's declared domain (this small synthetic study
    # has ~0.5 mm pixels) is named in the SR's text
    flagged = {f"{i['laterality']}-{i['view']}" for i in record["inputs"]
               if any(f.startswith("outside_domain:") for f in i.get("quality_flags") or [])}
    said = {text.split(":", 1)[0] for text in scores["texts"]
            if "outside the model's declared domain" in text}
    assert flagged and said == flagged

    # One SEG per image, on the exact grid of its source, referencing it.
    seen_sources = set()
    seg_uids = set()
    for seg_id in ids["seg"]:
        seg_path, seg = _fetch(stack, seg_id, tmp_path)
        seg_uids.add(str(seg.SOPInstanceUID))
        [(_, _, source_uid)] = hd.seg.segread(seg_path).get_source_image_uids()
        seen_sources.add(source_uid)
        assert (seg.Rows, seg.Columns) == (ROWS, COLS)
        # The default SEG is binary (the findings at the operating point, what OHIF draws),
        # uncompressed, so Orthanc serves it to web viewers without transcoding.
        assert seg.SegmentationType == "BINARY"
        assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert read_seg_regions(seg).shape == (ROWS, COLS)
        # its series (one per image) names the view, and says so when it is a flagged one
        key = sources[source_uid].stem  # make_study names each file by its view
        said = f"{key} outside domain: " if key in flagged else f"{key}: "
        assert seg.SeriesDescription.startswith(said), seg.SeriesDescription
        errors, _ = run_dciodvfy(seg_path)
        assert errors == [], errors
    assert seen_sources == set(sources)
    assert seg_uids == set(scores["seg_sop_uids"])  # the SR points at exactly these SEGs
    # The results sit beside the images in the PACS's study: everything they reference is there
    in_pacs = stack.orthanc.get_json(f"/studies/{orthanc_study}/instances")
    in_pacs_uids = {item["MainDicomTags"]["SOPInstanceUID"] for item in in_pacs}
    assert set(sources) | seg_uids | {str(sr.SOPInstanceUID)} <= in_pacs_uids  # (+ other objects)
    assert set(referenced) <= in_pacs_uids
    errors, _ = run_dciodvfy(sr_path)
    assert errors == [], errors

    # No PHI in logs: UIDs, SOP classes, counts and timings only.
    logs = stack.log_tail("node", 10_000_000) + stack.log_tail("worker", 10_000_000)
    assert "instance_received" in logs and "study_processed" in logs
    for phi in ("CANARY", "PID-CANARY-7731", "ACC-CANARY-5520"):
        assert phi not in logs


@pytest.mark.parametrize(("syntax", "flag"), [("j2k", "-xv"), ("rle", "-xr")])
def test_compressed_partial_study_is_scored_and_says_what_is_missing(
    stack: NodeStack, tmp_path: Path, syntax: str, flag: str
) -> None:
    seed = {"j2k": 103, "rle": 104}[syntax]
    paths = make_study(tmp_path / syntax, views=["R-CC", "L-CC"], rows=ROWS, cols=COLS,
                       transfer_syntax=syntax, seed=seed)
    result = stack.storescu(paths, flag)
    assert result.returncode == 0, result.stderr
    study_uid = _study_uid(paths[0])
    ids = stack.wait_for_results(study_uid, seg_count=2)
    record = stack.wait_for_record(study_uid)
    assert record["completion_reason"] == "quiet_period"
    assert record["missing_views"] == ["R-MLO", "L-MLO"]
    _, sr = _fetch(stack, ids["sr"][0], tmp_path)
    assert read_sr_scores(sr)["missing_views"] == ["R-MLO", "L-MLO"]
    assert {i["transfer_syntax_uid"] for i in record["inputs"]} == {
        str(dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)}


def test_undecodable_study_fails_with_a_reason(stack: NodeStack, tmp_path: Path) -> None:
    paths = make_study(tmp_path / "corrupt", views=["R-CC", "L-CC"], rows=ROWS, cols=COLS,
                       seed=105, corrupt=["R-CC", "L-CC"])
    result = stack.storescu(paths, "-xv")
    assert result.returncode == 0, result.stderr  # accepted: the header is fine
    record = stack.wait_for_record(_study_uid(paths[0]))
    assert record["state"] == "failed"
    assert "no scorable view" in record["error"]
    assert "undecodable pixel data" in record["error"]
    assert [i["scored"] for i in record["inputs"]] == [False, False]
    assert stack.result_ids(_study_uid(paths[0])) == {"sr": [], "seg": []}
    assert stack.echo() == 0, "the node is still answering"
    listed = _cli("runs", "list", "--state", "failed", "--config", str(stack.config_path),
                  env=stack.env())
    [line] = [json.loads(x) for x in listed.stdout.splitlines()
              if json.loads(x)["study_uid"] == _study_uid(paths[0])]
    assert line["state"] == "failed" and "undecodable pixel data" in line["error"]


def test_same_inputs_give_the_same_result_uids(stack: NodeStack, tmp_path: Path) -> None:
    """Sending a study twice rescores it; deterministic UIDs mean the PACS sees no duplicates."""
    paths = make_study(tmp_path / "twice", views=["L-CC"], rows=ROWS, cols=COLS, seed=106)
    study_uid = _study_uid(paths[0])
    assert stack.storescu(paths).returncode == 0
    first = stack.wait_for_results(study_uid, seg_count=1)
    stack.wait_for_record(study_uid)
    assert stack.storescu(paths).returncode == 0
    deadline_records = 0
    end = time.monotonic() + 120
    while time.monotonic() < end:
        deadline_records = sum(r.get("study_uid") == study_uid for r in stack.records("done"))
        if deadline_records >= 2:
            break
        time.sleep(0.3)
    assert deadline_records == 2
    assert stack.result_ids(study_uid) == first
    regions = [read_seg_regions(_fetch(stack, i, tmp_path)[1]) for i in first["seg"]]
    assert [r.shape for r in regions] == [(ROWS, COLS)]


def _tomosynthesis_file(folder: Path, study_uid: str) -> Path:
    """A small Breast Tomosynthesis instance: accepted by the node, recorded as not scored."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", "L", "CC"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 16, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(16 * 16 * 2 * 2)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bto.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_tomosynthesis_is_accepted_and_recorded_as_not_scored(stack: NodeStack, tmp_path: Path
                                                              ) -> None:
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    result = stack.storescu([_tomosynthesis_file(tmp_path, study_uid)], "-R")
    assert result.returncode == 0, result.stderr
    record = stack.wait_for_record(study_uid)
    assert record["state"] == "done"
    assert record["not_scored"] == "no scorable view: sop_class_not_scored"
    assert record["inputs"][0]["scored"] is False
    assert stack.result_ids(study_uid) == {"sr": [], "seg": []}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, check=False, timeout=120, env=env)


def test_echo_command_reaches_the_pacs(stack: NodeStack, tmp_path: Path) -> None:
    ok = _cli("echo", "pacs", "--config", str(stack.config_path), env=stack.env())
    assert ok.returncode == 0, ok.stderr
    assert "status 0x0000" in ok.stdout
    unknown = _cli("echo", "elsewhere", "--config", str(stack.config_path), env=stack.env())
    assert unknown.returncode == 2 and "unknown destination" in unknown.stderr
    config = yaml.safe_load(stack.config_path.read_text())
    live = dict(config["destinations"][0], name="pacs-live")
    config["destinations"][0]["port"] = free_port()  # nobody listens there
    config["destinations"][0]["timeout_s"] = 3
    config["destinations"].append(live)
    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump(config))
    unreachable = _cli("echo", "pacs", "--config", str(dead), env=stack.env())
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip() == ("C-ECHO pacs: failed: destination pacs: no association: "
                                          "connection refused (nothing listens on the "
                                          "destination's port)")  # one line, no library noise
    # Without a name: every destination, each on its line; 1 when any fails.
    every = _cli("echo", "--config", str(dead), env=stack.env())
    assert every.returncode == 1
    assert "C-ECHO pacs: failed" in every.stderr
    assert "C-ECHO pacs-live (" in every.stdout and "status 0x0000" in every.stdout


def test_worker_refuses_a_missing_or_tampered_bundle(stack: NodeStack, tmp_path: Path) -> None:
    config = yaml.safe_load(stack.config_path.read_text())
    config["model"]["bundle_dir"] = str(tmp_path / "no-bundle")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = _cli("worker", "--config", str(bad), env=stack.env())
    assert result.returncode == 2
    assert "model bundle rejected" in result.stderr and "folder not found" in result.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(DEFAULT_BUNDLE, tampered)
    with open(tampered / "model.ts", "ab") as handle:
        handle.write(b"\0")
    config["model"]["bundle_dir"] = str(tampered)
    bad.write_text(yaml.safe_dump(config))
    result = _cli("worker", "--config", str(bad), env=stack.env())
    assert result.returncode == 2 and "sha256" in result.stderr

"""Hostile or broken data sets sent by C-STORE: a precise status, nothing kept, nothing scored.

tests/integration/test_receive.py checks the UID rules on files handed to the handler directly;
here the bytes travel over a real association. pynetdicom is the sender, with chunked sending,
so the data set bytes after the file meta go out exactly as written (dcmtk's storescu would
parse, and refuse to send, most of them). The node runs in this process, listener only.

Afterwards: spool/tmp is empty, incoming/ has no study, a watcher pass claims nothing, no file
appeared outside the spool (the UIDs `../x` and `/tmp/x` never become paths), and the node
still answers C-ECHO and stores a good instance on the same association.

The worker's decode path (pipelines/study.py) refuses the same lies before decoding, for files
that reach a run by another way than our listener.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pynetdicom import _config
from pynetdicom.dsutils import split_dataset

from node.errors import InputError
from node.pynetdicom_internals import RequestorAE
from node.service import NodeService
from pipelines.study import decode_view, select_views
from tests.support.settings import make_settings
from tests.support.spooled import spool_run
from tools.stack.make_study import make_study

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom on the hostile values we write
]

MG = "1.2.840.10008.5.1.4.1.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeService]:
    root = tmp_path_factory.mktemp("hostile")
    settings = make_settings(
        root, listener=True, node={"network_timeout_s": 20},
        allowed_callers=[{"ae_title": "HOSTILE", "host": "127.0.0.1"},
                         {"ae_title": "ECHOSCU", "host": "127.0.0.1"}],
        completion={"quiet_period_s": 0.01, "deadline_s": 0.02},
    )
    service = NodeService(settings)
    service.scp.start()
    yield service
    service.scp.stop()


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _send(node: NodeService, paths: list[Path], durations_s: list[float] | None = None) -> list[int]:
    """C-STORE each file in one association; the statuses, in order (-1: no response)."""
    ae = RequestorAE(ae_title="HOSTILE")
    ae.add_requested_context(MG, [EXPLICIT])
    ae.add_requested_context(MG, [J2K_LOSSLESS])
    ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="MAMMO_NODE")
    assert assoc.is_established
    statuses = []
    try:
        for path in paths:
            started = time.monotonic()
            response = assoc.send_c_store(path)
            statuses.append(int(response.Status) if "Status" in response else -1)
            if durations_s is not None:
                durations_s.append(time.monotonic() - started)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _one(tmp_path: Path, syntax: str = "explicit", seed: int = 7) -> Path:
    [path] = make_study(tmp_path / f"{syntax}{seed}", views=["R-CC"], rows=128, cols=96,
                        transfer_syntax=syntax, seed=seed)
    return path


def _rewrite_body(path: Path, change: Callable[[bytes], bytes]) -> Path:
    """Keep the file meta (so the command is built from it) and alter the data set bytes."""
    _meta, offset = split_dataset(path)
    data = path.read_bytes()
    path.write_bytes(data[:offset] + change(data[offset:]))
    return path


def _element(body: bytes, group: int, element: int) -> int:
    position = body.find(struct.pack("<HH", group, element))
    assert position >= 0
    return position


def _truncated_pixels(tmp_path: Path) -> Path:
    return _rewrite_body(_one(tmp_path), lambda body: body[:-1000])


def _truncated_inside_an_element(tmp_path: Path) -> Path:
    """Cut inside the value of Study Description: its length runs past the end of the file."""
    return _rewrite_body(_one(tmp_path), lambda body: body[: _element(body, 0x0008, 0x1030) + 10])


def _truncated_between_elements(tmp_path: Path) -> Path:
    """Cut just before Rows: what arrived parses, but the image attributes are missing."""
    return _rewrite_body(_one(tmp_path), lambda body: body[: _element(body, 0x0028, 0x0010)])


def _garbage_body(tmp_path: Path) -> Path:
    garbage = bytes((i * 37 + 11) % 256 for i in range(4096))
    return _rewrite_body(_one(tmp_path), lambda body: garbage)


def _bad_vr(tmp_path: Path) -> Path:
    def change(body: bytes) -> bytes:
        at = _element(body, 0x0028, 0x0010)  # Rows, explicit VR "US"
        return body[: at + 4] + b"\x00\x01" + body[at + 6 :]
    return _rewrite_body(_one(tmp_path), change)


def _bad_length(tmp_path: Path) -> Path:
    def change(body: bytes) -> bytes:
        at = _element(body, 0x0008, 0x1030)  # Study Description, 2-byte length
        return body[: at + 6] + b"\xff\xff" + body[at + 8 :]
    return _rewrite_body(_one(tmp_path), change)


def _dataset(tmp_path: Path, syntax: str = "explicit", **changes: object) -> Path:
    path = _one(tmp_path, syntax)
    ds = dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)  # file meta kept as it was: the command carries the original UIDs
    return path


def _lying_j2k(tmp_path: Path, rows: int = 60000, cols: int = 60000) -> Path:
    path = _one(tmp_path, "j2k")
    ds = dcmread(path)
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    siz = frame.find(b"\xff\x4f\xff\x51") + 4
    ds.PixelData = encapsulate([frame[: siz + 4] + struct.pack(">LL", cols, rows) + frame[siz + 12 :]])
    ds.save_as(path)
    return path


def _command_differs(tmp_path: Path) -> Path:
    path = _one(tmp_path)
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(path)
    return path


CASES: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    "truncated_pixel_data": (_truncated_pixels, 0xC000, "pixel_data_truncated"),
    "truncated_inside_an_element": (_truncated_inside_an_element, 0xC000, "unreadable_dataset"),
    "truncated_between_elements": (_truncated_between_elements, 0xA900, "missing_or_invalid:Rows"),
    "garbage_after_preamble": (_garbage_body, 0xC000, "unreadable_dataset"),
    "bad_vr_on_rows": (_bad_vr, 0xA900, "missing_or_invalid:Rows"),
    "bad_length": (_bad_length, 0xC000, "unreadable_dataset"),
    "sop_instance_uid_differs_from_command": (_command_differs, 0xC001,
                                              "sop_instance_uid_differs_from_command"),
    "rows_inconsistent": (lambda p: _dataset(p, Rows=129), 0xC000,
                          "pixel_data_length_differs_from_image_attributes"),
    "columns_inconsistent": (lambda p: _dataset(p, Columns=4096), 0xC000,
                             "pixel_data_length_differs_from_image_attributes"),
    "bits_allocated_inconsistent": (lambda p: _dataset(p, BitsAllocated=8), 0xC000,
                                    "pixel_data_length_differs_from_image_attributes"),
    "samples_per_pixel_inconsistent": (lambda p: _dataset(p, SamplesPerPixel=3), 0xC000,
                                       "pixel_data_length_differs_from_image_attributes"),
    "j2k_header_claims_60000x60000": (_lying_j2k, 0xC000, "codestream_size_differs_from_rows_columns"),
    "j2k_rows_columns_over_the_cap": (
        lambda p: _dataset(p, "j2k", Rows=20000, Columns=20000), 0xC000, "image_too_large"),
    "study_uid_dotdot": (lambda p: _dataset(p, StudyInstanceUID=".."), 0xC001,
                         "invalid_uid:StudyInstanceUID"),
    "study_uid_relative_path": (lambda p: _dataset(p, StudyInstanceUID="../x"), 0xC001,
                                "invalid_uid:StudyInstanceUID"),
    "series_uid_absolute_path": (lambda p: _dataset(p, SeriesInstanceUID="/tmp/x"), 0xC001,
                                 "invalid_uid:SeriesInstanceUID"),
    "series_uid_too_long": (lambda p: _dataset(p, SeriesInstanceUID="1.2." + "3" * 70), 0xC001,
                            "invalid_uid:SeriesInstanceUID"),
    "sop_uid_with_nul": (lambda p: _dataset(p, SOPInstanceUID="1.2\x00.3"), 0xC001,
                         "invalid_uid:SOPInstanceUID"),
    "sop_uid_path": (lambda p: _dataset(p, SOPInstanceUID="../../x"), 0xC001,
                     "invalid_uid:SOPInstanceUID"),
}


def _files_outside(root: Path, spool: Path) -> set[Path]:
    return {p for p in root.rglob("*") if spool not in p.parents and p != spool}


@pytest.mark.timeout(120)
def test_every_hostile_instance_gets_its_status_and_leaves_nothing(
    node: NodeService, tmp_path: Path, chunked_send: None
) -> None:
    paths = {name: build(tmp_path / name) for name, (build, _status, _reason) in CASES.items()}
    good = _one(tmp_path, seed=8)
    spool = node.spool.root
    watched = spool.parent
    outside_before = _files_outside(watched, spool)
    slash_tmp_x_before = Path("/tmp/x").exists()
    audit_path = node.scp.audit.path
    audit_lines_before = len(audit_path.read_text().splitlines()) if audit_path.exists() else 0

    durations_s: list[float] = []
    statuses = _send(node, [*paths.values(), good], durations_s)

    expected = [status for _build, status, _reason in CASES.values()] + [0x0000]
    got = dict(zip([*CASES, "good"], (f"0x{s:04X}" for s in statuses), strict=True))
    assert statuses == expected, got
    # The reason the node gave for each, from its audit trail (one record per C-STORE).
    records = [json.loads(line) for line in audit_path.read_text().splitlines()[audit_lines_before:]]
    rejected = [r for r in records if r["event"] == "instance_rejected"]
    assert len(rejected) == len(CASES)
    for (name, (_build, _status, reason)), record in zip(CASES.items(), rejected, strict=True):
        assert record["reason"].startswith(reason), (name, record)

    assert not list(node.spool.tmp_dir.iterdir()), "nothing left in spool/tmp"
    [study] = node.spool.incoming_studies()  # only the good instance's study
    assert [e.sop_uid for e in study.instances] == [str(dcmread(good).SOPInstanceUID)]
    assert len(list(node.spool.incoming_dir.rglob("*.dcm"))) == 1
    assert _files_outside(watched, spool) == outside_before, "nothing written outside the spool"
    assert Path("/tmp/x").exists() == slash_tmp_x_before
    for name, status, duration_s in zip(got, statuses, durations_s, strict=True):
        print(f"{name}: 0x{status:04X} in {duration_s * 1000:.0f} ms")

    # Nothing hostile is scored: past the deadline the watcher claims the good study alone
    # (publishing then fails for want of a broker, so the run stays queued).
    time.sleep(0.05)
    node.watcher.tick()
    [run_id] = node.spool.runs("queued")
    info = json.loads((node.spool.state_dir("queued") / run_id / "run.json").read_text())
    assert info["instance_count"] == 1
    assert info["study_uid"] == str(dcmread(good).StudyInstanceUID)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_lying_j2k, "codestream_size_differs_from_rows_columns"),
        (lambda p: _dataset(p, Rows=129), "pixel data length"),
        (lambda p: _dataset(p, BitsAllocated=8), "pixel data length"),
        (lambda p: _dataset(p, "j2k", Rows=20000, Columns=20000), "unsupported geometry"),
    ],
    ids=["j2k_claims_60000x60000", "rows_inconsistent", "bits_inconsistent", "over_the_cap"],
)
def test_the_worker_refuses_lying_pixel_data_before_decoding(tmp_path: Path, build: Callable,
                                                             message: str) -> None:
    [selected], _skipped = select_views(spool_run(tmp_path, [build(tmp_path / "src")]))
    with pytest.raises(InputError, match=message):  # from the header: nothing is decoded
        decode_view(selected)

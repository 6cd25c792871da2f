"""Receive-time checks (node/validate.py): pure functions on the header, the pixel data's place in
the file and the file size; `read_header` is exercised on real files written by make_study."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.tag import Tag

from node import validate
from node.validate import (
    CodestreamGeometry,
    PixelDataExtent,
    Rejection,
)
from node.vocabulary import StoreStatus
from tools.stack.make_study import make_study

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on hostile values

MG = "1.2.840.10008.5.1.4.1.1.1.2"
SOP_UID = "1.2.826.0.1.3680043.8.498.1"


def _header(**changes: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = MG
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 64, 48, 16, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        elif isinstance(value, bytes):  # raw bytes as a peer would send them, converted on access
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
    return ds


NATIVE_BYTES = 64 * 48 * 2
NATIVE_EXTENT = PixelDataExtent(element_offset=1000, value_offset=1012, value_length=NATIVE_BYTES)
FILE_SIZE = 1012 + NATIVE_BYTES


def _check(header: Dataset, extent: PixelDataExtent | None = NATIVE_EXTENT, size: int = FILE_SIZE,
           command_sop_uid: str = SOP_UID, command_sop_class: str = MG) -> Rejection | None:
    return validate.check_instance(header, extent, size, command_sop_uid, command_sop_class)


def test_a_consistent_native_image_passes() -> None:
    assert _check(_header()) is None


@pytest.mark.parametrize(
    "value", ["..", "../x", "/tmp/x", "1.2." + "3" * 70, "1.2\x00.3", "1.02.3", "", "1.2.3.", "a.b"]
)
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_hostile_uids_are_invalid_uid(keyword: str, value: str) -> None:
    header = _header(**{keyword: value})
    command = value if keyword == "SOPInstanceUID" else SOP_UID
    rejection = _check(header, command_sop_uid=command)
    assert rejection is not None
    assert rejection.status == StoreStatus.INVALID_UID
    assert rejection.reason == f"invalid_uid:{keyword}"


def test_a_uid_with_an_undecodable_value_is_invalid() -> None:
    rejection = _check(_header(StudyInstanceUID=b"1.2\xff\xfe"))
    assert rejection == Rejection(StoreStatus.INVALID_UID, "invalid_uid:StudyInstanceUID")


def test_a_multi_valued_uid_is_invalid() -> None:
    rejection = _check(_header(StudyInstanceUID=["1.2.3", "1.2.4"]))
    assert rejection == Rejection(StoreStatus.INVALID_UID, "invalid_uid:StudyInstanceUID")


def test_a_missing_uid_is_invalid() -> None:
    rejection = _check(_header(SeriesInstanceUID=None))
    assert rejection == Rejection(StoreStatus.INVALID_UID, "invalid_uid:SeriesInstanceUID")


def test_sop_instance_uid_must_match_the_command() -> None:
    rejection = _check(_header(), command_sop_uid="1.2.3.4")
    assert rejection == Rejection(StoreStatus.INVALID_UID, "sop_instance_uid_differs_from_command")


def test_an_invalid_command_uid_is_refused_even_if_the_dataset_repeats_it() -> None:
    rejection = _check(_header(), command_sop_uid="../x")
    assert rejection is not None and rejection.status == StoreStatus.INVALID_UID


def test_sop_class_must_match_the_command() -> None:
    rejection = _check(_header(), command_sop_class="1.2.840.10008.5.1.4.1.1.1.2.1")
    assert rejection == Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                  "sop_class_differs_from_command")


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel"])
def test_missing_image_attributes_do_not_match_the_sop_class(keyword: str) -> None:
    rejection = _check(_header(**{keyword: None}))
    assert rejection == Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                  f"missing_or_invalid:{keyword}")


def test_missing_pixel_data_does_not_match_the_sop_class() -> None:
    rejection = _check(_header(), extent=None)
    assert rejection == Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "pixel_data_missing")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Rows": 65}, "pixel_data_length_differs_from_image_attributes"),
        ({"Columns": 4096}, "pixel_data_length_differs_from_image_attributes"),
        ({"BitsAllocated": 8}, "pixel_data_length_differs_from_image_attributes"),
        ({"SamplesPerPixel": 3}, "pixel_data_length_differs_from_image_attributes"),
        ({"NumberOfFrames": 2}, "pixel_data_length_differs_from_image_attributes"),
        ({"BitsAllocated": 12}, "invalid_bits_allocated"),
        ({"SamplesPerPixel": 2}, "invalid_samples_per_pixel"),
        ({"Rows": 0}, "empty_image"),
        ({"NumberOfFrames": 0}, "invalid_number_of_frames"),
        ({"NumberOfFrames": b"many"}, "invalid_number_of_frames"),
    ],
)
def test_image_attributes_must_agree_with_the_native_pixel_data(changes: dict, reason: str) -> None:
    assert _check(_header(**changes)) == Rejection(StoreStatus.CANNOT_UNDERSTAND, reason)


def test_native_pixel_data_running_past_the_end_of_the_file_is_truncated() -> None:
    rejection = _check(_header(), size=FILE_SIZE - 1)
    assert rejection == Rejection(StoreStatus.CANNOT_UNDERSTAND, "pixel_data_truncated")


def test_a_trailing_pad_byte_is_allowed() -> None:
    header = _header(Rows=63, Columns=3, BitsAllocated=8)  # 189 bytes, padded to 190
    extent = PixelDataExtent(element_offset=1000, value_offset=1012, value_length=190)
    assert _check(header, extent=extent, size=1012 + 190) is None


def _siz(rows: int, cols: int, components: int = 1) -> bytes:
    siz = struct.pack(">HHLLLLLLLLH", 38 + 3 * components, 0, cols, rows, 0, 0, cols, rows, 0, 0,
                      components)
    return b"\xff\x4f\xff\x51" + siz + b"\x07\x01\x01" * components


def _encapsulated(head: bytes) -> PixelDataExtent:
    return PixelDataExtent(element_offset=1000, value_offset=1012, value_length=None,
                           items_end=5000, first_fragment_head=head)


J2K = "1.2.840.10008.1.2.4.90"


def _j2k_header(**changes: object) -> Dataset:
    header = _header(**changes)
    header.file_meta.TransferSyntaxUID = J2K
    return header


def test_a_j2k_codestream_of_the_right_size_passes() -> None:
    assert _check(_j2k_header(), extent=_encapsulated(_siz(64, 48)), size=5000) is None


def test_a_j2k_codestream_claiming_a_huge_image_is_refused_before_decoding() -> None:
    rejection = _check(_j2k_header(), extent=_encapsulated(_siz(60000, 60000)), size=5000)
    assert rejection == Rejection(StoreStatus.CANNOT_UNDERSTAND, "codestream_size_differs_from_rows_columns")


def test_rows_and_columns_beyond_the_cap_are_refused_for_compressed_data() -> None:
    header = _j2k_header(Rows=20000, Columns=20000)  # 400 Mpixel, and the codestream agrees
    rejection = _check(header, extent=_encapsulated(_siz(20000, 20000)), size=5000)
    assert rejection == Rejection(StoreStatus.CANNOT_UNDERSTAND, "image_too_large")


def test_encapsulated_items_running_past_the_end_of_the_file_are_refused() -> None:
    extent = PixelDataExtent(element_offset=1000, value_offset=1012, value_length=None,
                             items_end=None, first_fragment_head=_siz(64, 48))
    rejection = _check(_j2k_header(), extent=extent, size=5000)
    assert rejection == Rejection(StoreStatus.CANNOT_UNDERSTAND,
                                  "encapsulated_pixel_data_truncated_or_malformed")


def test_compressed_syntax_with_native_pixel_data_is_refused() -> None:
    rejection = _check(_j2k_header(), extent=NATIVE_EXTENT)
    assert rejection == Rejection(StoreStatus.CANNOT_UNDERSTAND, "compressed_pixel_data_not_encapsulated")


def test_codestream_geometry_reads_jpeg_and_jpeg_ls_frame_headers() -> None:
    app0 = b"\xff\xe0\x00\x10" + b"JFIF\x00" + b"\x00" * 9
    sof = b"\xff\xc3\x00\x0b\x10" + struct.pack(">HH", 300, 200) + b"\x01\x01\x11\x00"
    assert validate.codestream_geometry(b"\xff\xd8" + app0 + sof) == CodestreamGeometry(300, 200, 1)
    sof55 = b"\xff\xf7\x00\x0b\x10" + struct.pack(">HH", 7, 9) + b"\x01\x01\x11\x00"
    assert validate.codestream_geometry(b"\xff\xd8" + sof55) == CodestreamGeometry(7, 9, 1)
    assert validate.codestream_geometry(b"\xff\xd8\xff\xda\x00\x08") is None  # scan, no frame
    assert validate.codestream_geometry(b"garbage") is None


# --- read_header on real files ---------------------------------------------------------------
@pytest.mark.parametrize("syntax", ["explicit", "j2k", "rle", "jpegls"])
def test_files_from_make_study_pass(tmp_path: Path, syntax: str) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=64, cols=48, transfer_syntax=syntax, seed=1)
    header, extent = validate.read_header(path)
    assert extent is not None
    assert (extent.value_length is None) == (syntax != "explicit")
    uid = str(header.SOPInstanceUID)
    assert validate.check_instance(header, extent, path.stat().st_size, uid, MG) is None


def _truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.mark.parametrize("syntax", ["explicit", "j2k"])
def test_truncated_files_are_refused(tmp_path: Path, syntax: str) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=64, cols=48, transfer_syntax=syntax, seed=1)
    size = path.stat().st_size
    _truncate(path, size - 7)
    header, extent = validate.read_header(path)
    rejection = validate.check_instance(header, extent, size - 7, str(header.SOPInstanceUID), MG)
    assert rejection is not None and rejection.status == StoreStatus.CANNOT_UNDERSTAND


def test_a_file_cut_inside_the_header_cannot_be_read(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=64, cols=48, seed=1)
    _truncate(path, 900)
    with pytest.raises(EOFError):
        validate.read_header(path)


def test_a_complete_data_set_without_pixel_data_has_no_extent(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=64, cols=48, seed=1)
    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    header, extent = validate.read_header(path)
    assert extent is None
    rejection = validate.check_instance(header, extent, path.stat().st_size,
                                        str(header.SOPInstanceUID), MG)
    assert rejection == Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "pixel_data_missing")


def test_the_codestream_of_a_real_j2k_file_is_read(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=64, cols=48, transfer_syntax="j2k", seed=1)
    ds = dcmread(path)
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    assert validate.codestream_geometry(frame[:200]) == CodestreamGeometry(64, 48, 1)
    # The same file with a codestream that claims 60000 x 60000: refused by the receive check.
    start = frame.find(b"\xff\x4f\xff\x51") + 4
    lying = frame[: start + 4] + struct.pack(">LL", 60000, 60000) + frame[start + 12 :]
    ds.PixelData = encapsulate([lying])
    ds.save_as(path, enforce_file_format=True)
    header, extent = validate.read_header(path)
    rejection = validate.check_instance(header, extent, path.stat().st_size,
                                        str(header.SOPInstanceUID), MG)
    assert rejection == Rejection(StoreStatus.CANNOT_UNDERSTAND, "codestream_size_differs_from_rows_columns")


def test_a_frame_split_into_tiny_fragments_is_read_across_them(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, views=["R-CC"], rows=64, cols=48, transfer_syntax="j2k", seed=1)
    ds = dcmread(path)
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([frame], fragments_per_frame=len(frame) // 16)
    ds.save_as(path, enforce_file_format=True)
    header, extent = validate.read_header(path)
    assert extent is not None and extent.first_fragment_head.startswith(frame[:64])
    assert validate.check_instance(header, extent, path.stat().st_size,
                                   str(header.SOPInstanceUID), MG) is None


def test_garbage_after_the_preamble_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8)
    with pytest.raises(Exception):  # noqa: B017 - any parse error becomes 0xC000 in the handler
        validate.read_header(path)

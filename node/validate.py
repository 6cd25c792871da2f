"""Checks on a received instance before it may enter the spool.

Everything here distrusts the peer's bytes: UIDs (they end up in manifests and logs, never in
paths), the image attributes against the amount of pixel data actually received, and for
compressed pixel data the dimensions the codestream itself claims, so a 60 000 x 60 000 JPEG 2000
header hidden behind Rows = 256 never reaches a decoder. The checks are pure functions of the
header, a summary of where the pixel data sits in the file and the file size; `read_header` is the
one function that touches the file, and it reads only the header and a few kilobytes of the first
compressed fragment.

Statuses (PS3.4 B.2.3): 0xC001 a UID that is invalid or differs from the command's; 0xA900 the
dataset is not the SOP class the command announced, or lacks the image attributes that class
requires; 0xC000 the dataset cannot be understood (unparseable, truncated, pixel data that
contradicts Rows / Columns / Bits Allocated / Samples per Pixel).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from node.uids import is_valid_uid
from node.vocabulary import (
    IMPLICIT_VR_LITTLE_ENDIAN,
    NATIVE_TRANSFER_SYNTAXES,
    RLE_LOSSLESS,
    StoreStatus,
)

# A compressed frame may not claim more pixels than this before anyone decodes it. The largest
# mammography detectors are about 4 800 x 5 800 (28 Mpixel); 100 Mpixel leaves room for any real
# modality while bounding a decoder's allocation to a few hundred MB.
MAX_ENCAPSULATED_FRAME_PIXELS = 100_000_000
MAX_FRAMES = 10_000  # breast tomosynthesis has tens to a few hundred
HEAD_BYTES = 65_536  # how much of the first compressed fragment `read_header` keeps

# Header elements the checks need (read with `specific_tags`, values of all others skipped).
HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PhotometricInterpretation",
)
UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_PIXEL_DATA_TAG = 0x7FE00010
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class Rejection:
    """Why an instance is refused: the C-STORE status and a short reason for logs and audit."""

    status: StoreStatus
    reason: str


@dataclass(frozen=True)
class PixelDataExtent:
    """Where the Pixel Data element sits in the received file (no pixel values are read).

    `value_length` is None for encapsulated (undefined length) pixel data; then `items_end` is
    the offset just after the sequence delimiter, or None when the item structure runs past the
    end of the file or is malformed, and `first_fragment_head` holds the first bytes of the
    fragments after the Basic Offset Table (up to HEAD_BYTES, across fragments, since a sender
    may split a frame anywhere), enough to read a codestream's own header.
    """

    element_offset: int
    value_offset: int
    value_length: int | None
    items_end: int | None = None
    first_fragment_head: bytes = b""


@dataclass(frozen=True)
class CodestreamGeometry:
    """What a compressed frame's own header says about the image it decodes to."""

    rows: int
    columns: int
    components: int


# --- reading (the only I/O) ------------------------------------------------------------------
def read_header(path: Path, extra_keywords: tuple[str, ...] = ()) -> tuple[Dataset, PixelDataExtent | None]:
    """The header elements the checks need and where the pixel data is; raises on unparseable or
    truncated bytes (an element whose length runs past the end of the file).

    pydicom rewinds to the start of the Pixel Data element when told to stop before pixels, so
    the file position after the header read is the element's offset.
    """
    with open(path, "rb") as handle:
        header = dcmread(
            handle,
            stop_before_pixels=True,
            specific_tags=list(dict.fromkeys(HEADER_KEYWORDS + extra_keywords)),
        )
        if "TransferSyntaxUID" not in header.file_meta:
            raise ValueError("no transfer syntax in the file meta information")
        explicit_vr = str(header.file_meta.TransferSyntaxUID) != IMPLICIT_VR_LITTLE_ENDIAN
        file_size = os.fstat(handle.fileno()).st_size
        if handle.tell() > file_size:  # pydicom skipped an element value that runs past the end
            raise EOFError("data set truncated: an element runs past the end of the file")
        return header, _locate_pixel_data(handle, file_size, explicit_vr)


def _locate_pixel_data(handle: Any, file_size: int, explicit_vr: bool) -> PixelDataExtent | None:
    offset = handle.tell()
    head = handle.read(12)
    if len(head) < 8:
        return None
    group, element = struct.unpack("<HH", head[:4])
    if (group << 16 | element) != _PIXEL_DATA_TAG:
        return None
    if explicit_vr and head[4:6] in (b"OB", b"OW", b"UN", b"OD", b"OF", b"OL", b"OV"):
        if len(head) < 12:
            return None
        length = struct.unpack("<L", head[8:12])[0]
        header_bytes = 12
    elif explicit_vr:
        length = struct.unpack("<H", head[6:8])[0]
        header_bytes = 8
    else:
        length = struct.unpack("<L", head[4:8])[0]
        header_bytes = 8
    value_offset = offset + header_bytes
    if length != _UNDEFINED_LENGTH:
        return PixelDataExtent(offset, value_offset, length)
    items_end, fragment_head = _walk_items(handle, value_offset, file_size)
    return PixelDataExtent(offset, value_offset, None, items_end, fragment_head)


def _walk_items(handle: Any, start: int, file_size: int) -> tuple[int | None, bytes]:
    """Follow the item headers of encapsulated pixel data (seeks; reads 8 bytes per item)."""
    position = start
    fragment_head = b""
    index = 0
    while position + 8 <= file_size:
        handle.seek(position)
        tag_group, tag_element, length = struct.unpack("<HHL", handle.read(8))
        tag = tag_group << 16 | tag_element
        if tag == _SEQUENCE_DELIMITER_TAG:
            return position + 8, fragment_head
        if tag != _ITEM_TAG or length == _UNDEFINED_LENGTH:
            return None, fragment_head
        if position + 8 + length > file_size:
            return None, fragment_head  # an item claims more bytes than were received
        if index >= 1 and len(fragment_head) < HEAD_BYTES:  # item 0 is the Basic Offset Table
            fragment_head += handle.read(min(length, HEAD_BYTES - len(fragment_head)))
        position += 8 + length
        index += 1
    return None, fragment_head


# --- pure checks -----------------------------------------------------------------------------
def check_uids(header: Dataset, command_sop_uid: str, command_sop_class: str) -> Rejection | None:
    """Every identifying UID is a syntactically valid UID and agrees with the C-STORE command."""
    uids = {name: _text(header, name) for name in UID_KEYWORDS}
    bad = [name for name, value in uids.items() if not is_valid_uid(value)]
    if bad:
        return Rejection(StoreStatus.INVALID_UID, "invalid_uid:" + ",".join(bad))
    if not is_valid_uid(command_sop_uid):
        return Rejection(StoreStatus.INVALID_UID, "invalid_uid:AffectedSOPInstanceUID")
    if uids["SOPInstanceUID"] != command_sop_uid:
        return Rejection(StoreStatus.INVALID_UID, "sop_instance_uid_differs_from_command")
    if uids["SOPClassUID"] != command_sop_class:
        return Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "sop_class_differs_from_command")
    return None


@dataclass(frozen=True)
class ImageGeometry:
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    photometric_interpretation: str

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns

    def native_bytes(self) -> int:
        """Length of the uncompressed pixel data, without the trailing pad byte (PS3.5 8.1.1)."""
        if self.photometric_interpretation in ("YBR_FULL_422", "YBR_PARTIAL_422"):
            per_frame = self.rows * self.columns * 2 * self.bits_allocated // 8
        else:
            bits = self.frame_pixels * self.samples_per_pixel * self.bits_allocated
            per_frame = bits // 8 if self.bits_allocated != 1 else (bits + 7) // 8
        return per_frame * self.frames


def image_geometry(header: Dataset) -> ImageGeometry | Rejection:
    """Rows, Columns, frames, samples and bits allocated, each present and plausible."""
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        value = _integer(header, keyword)
        if value is None:
            return Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"missing_or_invalid:{keyword}")
        values[keyword] = value
    frames = _integer(header, "NumberOfFrames") if "NumberOfFrames" in header else 1
    if frames is None or not 1 <= frames <= MAX_FRAMES:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "invalid_number_of_frames")
    if values["Rows"] < 1 or values["Columns"] < 1:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "empty_image")
    if values["BitsAllocated"] not in (1, 8, 16, 32):
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "invalid_bits_allocated")
    if values["SamplesPerPixel"] not in (1, 3):
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "invalid_samples_per_pixel")
    return ImageGeometry(
        rows=values["Rows"],
        columns=values["Columns"],
        frames=frames,
        samples_per_pixel=values["SamplesPerPixel"],
        bits_allocated=values["BitsAllocated"],
        photometric_interpretation=_text(header, "PhotometricInterpretation").strip().upper(),
    )


def check_pixel_data(
    geometry: ImageGeometry,
    transfer_syntax: str,
    extent: PixelDataExtent | None,
    file_size: int,
    max_frame_pixels: int = MAX_ENCAPSULATED_FRAME_PIXELS,
) -> Rejection | None:
    """The pixel data is all there and agrees with the image attributes (nothing is decoded)."""
    if extent is None:
        return Rejection(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "pixel_data_missing")
    if transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        if extent.value_length is None:
            return Rejection(StoreStatus.CANNOT_UNDERSTAND, "native_pixel_data_of_undefined_length")
        if extent.value_offset + extent.value_length > file_size:
            return Rejection(StoreStatus.CANNOT_UNDERSTAND, "pixel_data_truncated")
        expected = geometry.native_bytes()
        if extent.value_length not in (expected, expected + (expected % 2)):
            return Rejection(StoreStatus.CANNOT_UNDERSTAND, "pixel_data_length_differs_from_image_attributes")
        return None
    if extent.value_length is not None:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "compressed_pixel_data_not_encapsulated")
    if extent.items_end is None:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "encapsulated_pixel_data_truncated_or_malformed")
    if geometry.frame_pixels > max_frame_pixels:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "image_too_large")
    if not extent.first_fragment_head:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "encapsulated_pixel_data_empty")
    return check_codestream(geometry, transfer_syntax, extent.first_fragment_head)


def check_codestream(geometry: ImageGeometry, transfer_syntax: str, head: bytes) -> Rejection | None:
    """A compressed frame's own header must describe the image the DICOM attributes describe."""
    if transfer_syntax == RLE_LOSSLESS:
        if len(head) < 64:
            return Rejection(StoreStatus.CANNOT_UNDERSTAND, "rle_header_truncated")
        segments = struct.unpack("<L", head[:4])[0]
        if segments != geometry.samples_per_pixel * max(geometry.bits_allocated // 8, 1):
            return Rejection(StoreStatus.CANNOT_UNDERSTAND, "rle_segments_differ_from_image_attributes")
        return None
    claimed = codestream_geometry(head)
    if claimed is None:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "codestream_header_unreadable")
    if (claimed.rows, claimed.columns) != (geometry.rows, geometry.columns):
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "codestream_size_differs_from_rows_columns")
    if claimed.components != geometry.samples_per_pixel:
        return Rejection(StoreStatus.CANNOT_UNDERSTAND, "codestream_components_differ_from_samples")
    return None


def codestream_geometry(head: bytes) -> CodestreamGeometry | None:
    """Rows, columns and components from a JPEG 2000 SIZ or a JPEG / JPEG-LS SOF marker."""
    start = head.find(b"\xff\x4f\xff\x51")  # J2K: SOC then SIZ (also inside a JP2 'jp2c' box)
    if start >= 0:
        siz = head[start + 4 :]
        if len(siz) < 38:
            return None
        x_siz, y_siz, x_offset, y_offset = struct.unpack(">LLLL", siz[4:20])
        components = struct.unpack(">H", siz[36:38])[0]
        if x_siz <= x_offset or y_siz <= y_offset:
            return None
        return CodestreamGeometry(y_siz - y_offset, x_siz - x_offset, components)
    if not head.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 4 <= len(head):
        if head[position] != 0xFF:
            return None
        marker = head[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = struct.unpack(">H", head[position + 2 : position + 4])[0]
        is_sof = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)
        if is_sof or marker == 0xF7:  # SOF0..SOF15, JPEG-LS SOF55
            if position + 10 > len(head):
                return None
            rows, columns = struct.unpack(">HH", head[position + 5 : position + 9])
            return CodestreamGeometry(rows, columns, head[position + 9])
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def check_instance(
    header: Dataset,
    extent: PixelDataExtent | None,
    file_size: int,
    command_sop_uid: str,
    command_sop_class: str,
    max_frame_pixels: int = MAX_ENCAPSULATED_FRAME_PIXELS,
) -> Rejection | None:
    """All receive-time checks in order; None when the instance may enter the spool."""
    rejection = check_uids(header, command_sop_uid, command_sop_class)
    if rejection is not None:
        return rejection
    geometry = image_geometry(header)
    if isinstance(geometry, Rejection):
        return geometry
    transfer_syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
    return check_pixel_data(geometry, transfer_syntax, extent, file_size, max_frame_pixels)


def _text(header: Dataset, keyword: str) -> str:
    try:
        value = header.get(keyword, "")
    except Exception:  # a value the peer encoded so badly pydicom cannot convert it
        return "\x00invalid"
    return "" if value is None else str(value)


def _integer(header: Dataset, keyword: str) -> int | None:
    try:
        value = header.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:  # wrong VR, multi-valued, non-numeric text
        return None

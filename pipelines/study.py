"""Loading a run: pick the views to score, decode them and bring them to one orientation.

The model sees every breast with the chest wall on the left (as a left breast is displayed) and
the lateral side up on CC views; heatmaps are flipped back with the same flips, so they overlay
the source image exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_fragmented_frames

from node import validate
from node.errors import InputError
from node.scp import MG_FOR_PRESENTATION, MG_FOR_PROCESSING
from node.spool import InstanceEntry, read_manifest
from node.validate import MAX_ENCAPSULATED_FRAME_PIXELS
from pipelines.results import SCREENING_VIEWS

SCORABLE_SOP_CLASSES = (MG_FOR_PRESENTATION, MG_FOR_PROCESSING)
JPEG_LS_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
# Rows x Columns above this is a lying header, not a mammogram: refused before any decoder
# allocates for it (node/validate.py documents the figure; the listener applies it too).
MAX_PIXELS = MAX_ENCAPSULATED_FRAME_PIXELS


@dataclass(frozen=True)
class Orientation:
    """Flips that take the stored image to the model's convention (each is its own inverse)."""

    flip_columns: bool  # mirror left-right
    flip_rows: bool  # mirror top-bottom

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.flip_columns:
            array = array[:, ::-1]
        if self.flip_rows:
            array = array[::-1, :]
        return np.ascontiguousarray(array)


@dataclass(frozen=True)
class SelectedView:
    entry: InstanceEntry
    path: Path


@dataclass(frozen=True)
class Skipped:
    """An instance that is in the run but not scored, and why (goes into record.json)."""

    sop_uid: str
    reason: str


@dataclass
class LoadedView:
    entry: InstanceEntry
    path: Path
    header: Dataset
    orientation: Orientation
    pixels: np.ndarray  # float32, oriented, MONOCHROME2 sense


def orientation_for(laterality: str, view: str, patient_orientation: list[str] | None) -> Orientation:
    """Derive the flips from PatientOrientation (row, column directions), else from laterality.

    Row direction "P" means the image runs towards the chest wall from left to right, i.e. the
    chest wall is on the right: mirror it. Column direction "H" means the image is upside down.
    On CC views the lateral side belongs at the top: for a right breast that is column direction
    "L", for a left breast "R".
    """
    row_dir = col_dir = ""
    if patient_orientation and len(patient_orientation) == 2:
        row_dir, col_dir = (str(v).upper() for v in patient_orientation)
    if row_dir[:1] in ("A", "P"):
        flip_columns = row_dir.startswith("P")
    else:
        flip_columns = laterality == "R"
    flip_rows = col_dir.startswith("H")
    if view == "CC" and col_dir[:1] in ("L", "R"):
        lateral_down = (laterality == "R" and col_dir.startswith("R")) or (
            laterality == "L" and col_dir.startswith("L")
        )
        flip_rows = flip_rows or lateral_down
    return Orientation(flip_columns=flip_columns, flip_rows=flip_rows)


def select_views(run_dir: Path) -> tuple[list[SelectedView], list[Skipped]]:
    """One image per screening view (R-CC, L-CC, R-MLO, L-MLO); everything else is skipped.

    For Presentation is preferred over For Processing of the same view; among repeats the last
    received wins (a retake replaces the image it repeats).
    """
    entries = sorted(read_manifest(run_dir), key=lambda e: e.received_at)
    chosen: dict[str, InstanceEntry] = {}
    skipped: list[Skipped] = []
    for entry in entries:
        if entry.sop_class_uid not in SCORABLE_SOP_CLASSES:
            skipped.append(Skipped(entry.sop_uid, "sop_class_not_scored"))
            continue
        if entry.view_key not in SCREENING_VIEWS:
            skipped.append(Skipped(entry.sop_uid, f"view_not_scored:{entry.view_key}"))
            continue
        current = chosen.get(entry.view_key)
        if current is not None:
            keep_current = (
                current.sop_class_uid == MG_FOR_PRESENTATION
                and entry.sop_class_uid == MG_FOR_PROCESSING
            )
            loser = entry if keep_current else current
            skipped.append(Skipped(loser.sop_uid, "superseded_by_another_image_of_the_view"))
            if keep_current:
                continue
        chosen[entry.view_key] = entry
    selected = [
        SelectedView(chosen[key], run_dir / chosen[key].file)
        for key in SCREENING_VIEWS
        if key in chosen
    ]
    return selected, skipped


def _check_pixel_data_before_decoding(ds: Dataset) -> None:
    """Native pixel data must be exactly as long as the image attributes say; a compressed frame's
    own header must describe the same Rows x Columns. Checked here as well as at receive time,
    because a decoder trusts the codestream: a JPEG 2000 header claiming 60000 x 60000 would
    make it allocate gigabytes whatever Rows and Columns say."""
    geometry = validate.image_geometry(ds)
    if isinstance(geometry, validate.Rejection):
        raise InputError(f"invalid image attributes: {geometry.reason}")
    if "PixelData" not in ds:
        raise InputError("no pixel data")
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if transfer_syntax in validate.NATIVE_TRANSFER_SYNTAXES:
        expected, actual = geometry.native_bytes(), len(ds.PixelData)
        if actual not in (expected, expected + expected % 2):
            raise InputError(f"pixel data length {actual} differs from the {expected} bytes that "
                             f"Rows x Columns x Bits Allocated x Samples per Pixel give")
        return
    try:
        fragments = next(generate_fragmented_frames(ds.PixelData, number_of_frames=1))
    except Exception as error:
        raise InputError(f"malformed encapsulated pixel data: {type(error).__name__}") from error
    head = b"".join(fragments)[: validate.HEAD_BYTES]
    rejection = validate.check_codestream(geometry, transfer_syntax, head)
    if rejection is not None:
        raise InputError(f"compressed pixel data refused before decoding: {rejection.reason}")


def decode_view(selected: SelectedView) -> LoadedView:
    """Decode and orient one image; InputError with a reason if its pixels cannot be used."""
    try:
        ds = dcmread(selected.path)
    except Exception as error:
        raise InputError(f"unreadable file: {type(error).__name__}") from error
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or rows * cols > MAX_PIXELS or frames != 1:
        raise InputError(f"unsupported geometry: rows={rows} columns={cols} frames={frames}")
    _check_pixel_data_before_decoding(ds)
    try:
        if str(ds.file_meta.TransferSyntaxUID) in JPEG_LS_TRANSFER_SYNTAXES:
            ds.pixel_array_options(decoding_plugin="pyjpegls")  # ~3x faster than the default
        pixels = ds.pixel_array
    except Exception as error:
        raise InputError(f"undecodable pixel data: {type(error).__name__}: {error}"[:300]) from error
    if pixels.shape != (rows, cols):
        raise InputError(f"pixel data shape {pixels.shape} differs from Rows x Columns")
    pixels = pixels.astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        pixels = float(2**bits - 1) - pixels
    orientation = orientation_for(
        selected.entry.laterality, selected.entry.view, list(ds.get("PatientOrientation", []) or [])
    )
    del ds.PixelData  # keep the header only; pixels live in `pixels`
    return LoadedView(
        entry=selected.entry,
        path=selected.path,
        header=ds,
        orientation=orientation,
        pixels=orientation.apply(pixels),
    )

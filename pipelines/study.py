"""Loading a run: pick the views to score, decode them and bring them to one orientation.

The model sees every breast with the chest wall on the left (as a left breast is displayed) and
the lateral side up on CC views; the rule is pipelines/orientation.py's, shared with training and
evaluation. Heatmaps are flipped back with the same flips, so they overlay the source image
exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_fragmented_frames

from node import validate
from node.errors import InputError
from node.runs import InstanceEntry, read_manifest
from node.validate import MAX_ENCAPSULATED_FRAME_PIXELS
from node.vocabulary import (
    JPEG_LS_TRANSFER_SYNTAXES,
    MG_FOR_PRESENTATION,
    MG_FOR_PROCESSING,
    NATIVE_TRANSFER_SYNTAXES,
    SCORABLE_SOP_CLASSES,
)
from pipelines.orientation import Orientation, orientation_from_tags
from pipelines.quality import DEFAULT_LOW_CONTRAST_FRACTION, image_flags, pixel_spacing_of
from pipelines.results import SCREENING_VIEWS

# Rows x Columns above this is a lying header, not a mammogram: refused before any decoder
# allocates for it (node/validate.py documents the figure; the listener applies it too).
MAX_PIXELS = MAX_ENCAPSULATED_FRAME_PIXELS


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
    # oriented, MONOCHROME2 sense: the stored integers (float32 for MONOCHROME1, inverted);
    # the preprocessing converts only what it uses (the breast's crop) to float
    pixels: npt.NDArray[np.number[Any]]
    quality_flags: tuple[str, ...] = ()  # pipelines/quality.py, from the header and the pixels
    pixel_spacing_mm: float | None = None  # PixelSpacing, else ImagerPixelSpacing; None: unknown


def contralateral_indices(views: Sequence[LoadedView]) -> list[int | None]:
    """For each view, the index of the same view (CC, MLO) of the other breast, or None."""
    where = {(view.entry.laterality, view.entry.view): index for index, view in enumerate(views)}
    other = {"L": "R", "R": "L"}
    return [where.get((other.get(view.entry.laterality, ""), view.entry.view)) for view in views]


def predict_views(predictor: Any, views: Sequence[LoadedView]) -> list[Any]:
    """The predictor's predictions of the loaded views. A bundle with a physical pixel size
    (`input.pixel_spacing_mm`) is also given each view's type and pixel spacing, which its
    preprocessing needs (breast crop resampled to a fixed mm per pixel), and, when it reads a
    breast against the other (`contralateral`), where each view's counterpart is; other
    predictors get the pixels alone, as before."""
    pixels = [view.pixels for view in views]
    metadata = getattr(predictor, "metadata", None)
    if not (isinstance(metadata, dict) and metadata.get("input", {}).get("pixel_spacing_mm")):
        return list(predictor.predict(pixels))
    accepts = inspect.signature(predictor.predict).parameters
    kinds = [view.entry.view for view in views]
    extra: dict[str, Any] = {}
    if "contralateral" in accepts and metadata.get("contralateral") is not None:
        extra["contralateral"] = contralateral_indices(views)
    if "pixel_spacings" in accepts:
        return list(predictor.predict(pixels, kinds, **extra,
                                      pixel_spacings=[view.pixel_spacing_mm for view in views]))
    # a wrapper that forwards the view types only: the bundle's assumed spacing is used
    return list(predictor.predict(pixels, kinds))


def select_views(run_dir: Path, manifest: Sequence[InstanceEntry] | None = None
                 ) -> tuple[list[SelectedView], list[Skipped]]:
    """One image per screening view (R-CC, L-CC, R-MLO, L-MLO); everything else is skipped.

    For Presentation is preferred over For Processing of the same view; among repeats the last
    received wins (a retake replaces the image it repeats). `manifest` is the run's manifest
    when the caller has read it already (the worker reads it once per run); else it is read here.
    """
    if manifest is None:
        manifest = read_manifest(run_dir)
    entries = sorted(manifest, key=lambda e: e.received_at)
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
    if transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
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


def decode_view(selected: SelectedView,
                low_contrast_fraction: float = DEFAULT_LOW_CONTRAST_FRACTION) -> LoadedView:
    """Decode and orient one image; InputError with a reason if its pixels cannot be used. Its
    quality flags (pipelines/quality.py) are computed here, from the header and pixels in hand."""
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
        decoded = ds.pixel_array
    except Exception as error:
        raise InputError(f"undecodable pixel data: {type(error).__name__}: {error}"[:300]) from error
    if decoded.shape != (rows, cols):
        raise InputError(f"pixel data shape {decoded.shape} differs from Rows x Columns")
    orientation = orientation_from_tags(
        selected.entry.laterality, selected.entry.view, list(ds.get("PatientOrientation", []) or [])
    )
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        inverted = np.float32(2**bits - 1) - decoded.astype(np.float32)
        flags = image_flags(ds, inverted, low_contrast_fraction)
        pixels = orientation.apply(inverted)
    else:  # the stored integers, flipped: no full-size float32 copy (54 MB of fresh memory per
        # 4096 x 3328 view, whose page faults made the decode vary 0.15-0.7 s per study)
        flags = image_flags(ds, decoded, low_contrast_fraction)
        pixels = np.ascontiguousarray(orientation.apply(decoded))
    del ds.PixelData  # keep the header only; pixels live in `pixels`
    return LoadedView(
        entry=selected.entry,
        path=selected.path,
        header=ds,
        orientation=orientation,
        pixels=pixels,
        quality_flags=flags,
        pixel_spacing_mm=pixel_spacing_of(ds),
    )

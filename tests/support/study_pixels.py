"""Given pixels into a synthetic MG instance, for tests that feed the worker exact images."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from tools.stack.make_study import add_pixels, format_ds


def replace_pixels(
    ds: Dataset, pixels: np.ndarray, bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
) -> None:
    """Put given pixels (uint8 or uint16, stored as they are) into an instance `build_view_dataset` built.

    For tests that feed the worker's DICOM path the very pixels of a PNG (consistency with the
    evaluation tool) or real images; a MONOCHROME1 caller passes already inverted pixels.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels must be 2-D uint8 or uint16, got {pixels.dtype} {pixels.shape}")
    allocated = pixels.dtype.itemsize * 8
    bits = bits_stored or allocated
    if not 1 <= bits <= allocated or int(pixels.max()) >= 1 << bits:
        raise ValueError(f"bits_stored {bits} does not hold these {allocated}-bit pixels")
    add_pixels(ds, pixels)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    if "WindowCenter" in ds:
        ds.WindowCenter = format_ds(2 ** (bits - 1))
        ds.WindowWidth = format_ds(2**bits)

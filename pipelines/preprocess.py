"""The one preprocessing function shared by training, evaluation and the worker.

A bundle's metadata describes its own preprocessing (input size, intensity percentiles), so a
model is always fed exactly as it was trained. Input: a 2-D array already oriented to the
bundle's convention (chest wall on the left), bright = dense, any size and bit depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.transforms.compose import Compose
from monai.transforms.intensity.array import ScaleIntensityRangePercentiles
from monai.transforms.spatial.array import Resize
from monai.transforms.utility.array import EnsureType


def input_size(metadata: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the model input, as the bundle declares it."""
    height, width = metadata["input"]["height"], metadata["input"]["width"]
    return int(height), int(width)


def build_preprocess(metadata: dict[str, Any]) -> Callable[[np.ndarray], torch.Tensor]:
    """(rows, cols) array -> (1, H, W) float tensor in [0, 1].

    Area resizing first (cheap on a 4096 x 3328 image, and small bright structures do not alias
    away), then percentile scaling, which makes 8-bit film and 12/16-bit digital comparable.
    Nothing is cropped, so a heatmap on the model grid maps back to the input grid by resizing.
    A plain tensor comes out (no MONAI metadata): the TorchScript model needs nothing else.
    """
    intensity = metadata["input"]["intensity"]
    transform = Compose([
        Resize(spatial_size=input_size(metadata), mode="area"),
        ScaleIntensityRangePercentiles(
            lower=float(intensity["lower_percentile"]),
            upper=float(intensity["upper_percentile"]),
            b_min=0.0, b_max=1.0, clip=True, relative=False,
        ),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])

    def preprocess(image: np.ndarray) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {array.shape}")
        tensor = transform(array[None])
        if not isinstance(tensor, torch.Tensor):  # EnsureType(data_type="tensor") guarantees it
            raise TypeError(f"preprocessing gave {type(tensor).__name__}, not a tensor")
        return tensor

    return preprocess


def uses_breast_mask(metadata: dict[str, Any]) -> bool:
    """Whether the bundle asks for breast segmentation (`input.breast_mask: true`); bundles
    without the key (the default one included) are fed and mapped exactly as before."""
    return bool(metadata["input"].get("breast_mask", False))


def prepare_image(image: np.ndarray, metadata: dict[str, Any],
                  view: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image to preprocess and its breast mask, the same in training and in the worker.

    Without `input.breast_mask` in the metadata: the image unchanged and no mask. With it:
    `pipelines/breast.py:breast_mask` on the oriented image (pectoral looked for unless `view`
    is "CC"), the pixels outside it set to the background level, and the mask, which
    `mask_heatmap` applies to the heatmap on the same grid."""
    if not uses_breast_mask(metadata):
        return image, None
    from pipelines.breast import apply_breast_mask

    return apply_breast_mask(image, view)


def mask_heatmap(heatmap: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The heatmap with zero outside the breast (and on the border), or unchanged without a mask."""
    if mask is None:
        return heatmap
    if mask.shape != heatmap.shape:
        raise ValueError(f"breast mask {mask.shape} and heatmap {heatmap.shape} differ")
    return np.where(mask, heatmap, np.float32(0.0)).astype(np.float32, copy=False)

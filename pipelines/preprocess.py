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

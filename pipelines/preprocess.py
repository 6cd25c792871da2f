"""The one preprocessing function shared by training, evaluation and the worker.

A bundle's metadata describes its own preprocessing (input size, intensity percentiles), so a
model is always fed exactly as it was trained. Input: a 2-D array already oriented to the
bundle's convention (chest wall on the left), bright = dense, any size and bit depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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


def pectoral_detector(metadata: dict[str, Any]) -> int:
    """Which pectoral search a bundle was trained with (`input.pectoral_detector`, 1 or 2,
    `pipelines.breast.find_pectoral`); bundles without the key, the shipped one included, 1."""
    return int(metadata["input"].get("pectoral_detector", 1))


def cell_mask_detector(metadata: dict[str, Any]) -> int:
    """Which pectoral detector's mask gives a canvas bundle its breast cells
    (`input.cell_mask_detector`): the canvas's own (`pectoral_detector`) unless the bundle
    declares another. `canvas_input` then negates the breast pixels the canvas keeps and that
    mask leaves out (the muscle only the other detector cuts): the network reads |x| as its image
    and takes its breast cells where x > 0."""
    return int(metadata["input"].get("cell_mask_detector", pectoral_detector(metadata)))


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

    return apply_breast_mask(image, view, pectoral_detector(metadata))


def mask_heatmap(heatmap: np.ndarray, mask: np.ndarray | None, *, in_place: bool = False
                 ) -> np.ndarray:
    """The heatmap with zero outside the breast (and on the border), or unchanged without a mask.

    `in_place`: the caller owns a float32 heatmap and gives it up: it is masked where it lies
    (a multiply by the boolean mask, ~10 × faster than a new full-size array at 4096 × 3328;
    the maps are finite, clamped to [0, 1])."""
    if mask is None:
        return heatmap
    if mask.shape != heatmap.shape:
        raise ValueError(f"breast mask {mask.shape} and heatmap {heatmap.shape} differ")
    if in_place and heatmap.dtype == np.float32 and heatmap.flags.writeable:
        np.multiply(heatmap, mask, out=heatmap)
        return heatmap
    return np.where(mask, heatmap, np.float32(0.0)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- physical canvas
#
# A bundle whose metadata has `input.pixel_spacing_mm` is fed a breast at a fixed pixel size:
# the oriented image (chest wall left) is segmented (`pipelines/breast.py`), cropped to the
# breast's bounding box, resampled from the image's own pixel spacing to the bundle's, windowed
# by the intensity percentiles of the breast pixels only, set to 0 outside the breast and
# placed in the top-left corner of a fixed height x width canvas (chest wall on its left edge).
# A breast larger than the canvas at that spacing is shrunk further to fit (`Placement.scale`
# says by how much). `Placement` records where the canvas came from, so a canvas heatmap maps
# back to the source grid exactly (`Placement.to_source`). Older bundles (whole image resized,
# no `pixel_spacing_mm`) get a `Placement` of the whole image and map back as before.


@dataclass(frozen=True)
class Placement:
    """Where the model canvas came from: source rows [top, bottom) x columns [left, right) were
    resampled to canvas rows [0, height) x columns [0, width); the rest of the canvas is padding."""

    rows: int
    cols: int
    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int
    spacing_mm: float | None = None  # the canvas's pixel size on this image, when known

    def to_source(self, heatmap: torch.Tensor,
                  finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """A canvas-grid map (H, W) on the source grid (rows, cols): its content region resized
        (bilinear, align_corners=False: cell centres stay put) to the crop box, passed through
        `finish` when given (on the crop box only), zero outside it."""
        content = heatmap[None, None, : self.height, : self.width].float()
        resized = F.interpolate(content, size=(self.bottom - self.top, self.right - self.left),
                                mode="bilinear", align_corners=False)[0, 0]
        if finish is not None:
            resized = finish(resized)
        if (self.top, self.left, self.bottom, self.right) == (0, 0, self.rows, self.cols):
            return resized
        full = torch.zeros(self.rows, self.cols, dtype=torch.float32)
        full[self.top:self.bottom, self.left:self.right] = resized
        return full

    def point_to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """Source pixel (x = column, y = row) -> canvas pixel coordinates."""
        sx = self.width / (self.right - self.left)
        sy = self.height / (self.bottom - self.top)
        return (x + 0.5 - self.left) * sx - 0.5, (y + 0.5 - self.top) * sy - 0.5

    @property
    def scale(self) -> float:
        """Canvas pixels per source pixel (mean of both axes)."""
        return 0.5 * (self.width / (self.right - self.left) + self.height / (self.bottom - self.top))


def uses_canvas(metadata: dict[str, Any]) -> bool:
    """Whether the bundle declares a physical pixel size (`input.pixel_spacing_mm`): breast crop,
    resampling, breast-only windowing, fixed canvas. Bundles without it resize the whole image."""
    return metadata["input"].get("pixel_spacing_mm") is not None


def whole_image_placement(rows: int, cols: int, metadata: dict[str, Any]) -> Placement:
    height, width = input_size(metadata)
    return Placement(rows, cols, 0, rows, 0, cols, height, width)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    rows_any, cols_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows_any) == 0:  # no breast found: the whole image
        return 0, mask.shape[0], 0, mask.shape[1]
    top = max(0, int(rows_any[0]) - margin)
    bottom = min(mask.shape[0], int(rows_any[-1]) + 1 + margin)
    left = max(0, int(cols_any[0]) - margin)
    right = min(mask.shape[1], int(cols_any[-1]) + 1 + margin)
    return top, bottom, left, right


def _resampled_mask(crop_mask: np.ndarray, height: int, width: int) -> torch.Tensor:
    """A source-grid mask crop on a height x width grid (antialiased bilinear, kept where >= 0.5)."""
    tensor = torch.from_numpy(np.ascontiguousarray(crop_mask)).float()
    return F.interpolate(tensor[None, None], size=(height, width), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0] >= 0.5


def mask_in_placement(mask: np.ndarray, placement: Placement) -> torch.Tensor:
    """A source-grid mask (another breast mask of the same image, e.g. another pectoral
    detector's) on a `Placement`'s content grid (placement.height x placement.width), resampled
    as `windowed_breast` resamples its own."""
    return _resampled_mask(mask[placement.top:placement.bottom, placement.left:placement.right],
                           placement.height, placement.width)


def windowed_breast(image: np.ndarray, metadata: dict[str, Any], view: str | None = None,
                    pixel_spacing_mm: float | None = None, mask: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, Placement, np.ndarray]:
    """The breast's crop at the bundle's pixel size, windowed to [0, 1] by its own percentiles
    (0 outside the breast), the breast on that grid, its `Placement` on the canvas, and the breast
    mask on the source grid. `canvas_input` places it on the canvas.

    `pixel_spacing_mm`: the image's pixel size (PixelSpacing, else ImagerPixelSpacing); None
    (unknown) is taken as the spacing the bundle was trained on (`input.assumed_pixel_spacing_mm`,
    the worker flags such an image `outside_domain:pixel_spacing_missing`). `mask`: the image's
    breast mask when already made (with the bundle's pectoral detector), else made here."""
    from pipelines.breast import breast_mask

    spec = metadata["input"]
    height, width = input_size(metadata)
    target = float(spec["pixel_spacing_mm"])
    source = pixel_spacing_mm if pixel_spacing_mm and pixel_spacing_mm > 0 else float(
        spec.get("assumed_pixel_spacing_mm", target))
    array = np.asarray(image)  # converted to float32 only on the crop, not the whole image
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {array.shape}")
    if mask is None:
        mask = breast_mask(array, view, pectoral_detector=pectoral_detector(metadata))
    margin = int(round(float(spec.get("crop_margin_mm", 2.0)) / source))
    top, bottom, left, right = _bounding_box(mask, margin)
    scale = min(source / target, height / (bottom - top), width / (right - left))
    out_h = max(1, min(height, int(round((bottom - top) * scale))))
    out_w = max(1, min(width, int(round((right - left) * scale))))
    crop = torch.from_numpy(np.ascontiguousarray(array[top:bottom, left:right], dtype=np.float32))
    resized = F.interpolate(crop[None, None], size=(out_h, out_w), mode="bilinear",
                            align_corners=False, antialias=True)[0, 0]
    inside = _resampled_mask(mask[top:bottom, left:right], out_h, out_w)
    intensity = spec["intensity"]
    values = resized[inside] if bool(inside.any()) else resized.flatten()
    # numpy's linear-interpolated quantiles (a partial sort) equal torch.quantile's (a full sort)
    sample = values[:: max(1, values.numel() // 200_000)].numpy().astype(np.float64)
    low, high = (float(np.float32(v)) for v in np.quantile(sample, [
        float(intensity["lower_percentile"]) / 100, float(intensity["upper_percentile"]) / 100]))
    scaled = ((resized - low) / max(high - low, 1e-6)).clamp_(0.0, 1.0)
    scaled = torch.where(inside, scaled, torch.zeros((), dtype=torch.float32))
    placement = Placement(array.shape[0], array.shape[1], top, bottom, left, right, out_h, out_w,
                          target * (source / target) / scale)
    return scaled, inside, placement, mask


def breast_quantiles(values: torch.Tensor | np.ndarray, levels: int) -> np.ndarray:
    """The values' quantile function at `levels` evenly spaced levels from 0 to 1 (linear
    interpolation), float64."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("no breast pixels to take quantiles of")
    return np.quantile(array, np.linspace(0.0, 1.0, levels))


def match_quantiles(values: torch.Tensor, reference: Any) -> torch.Tensor:
    """Histogram matching: each value replaced by the reference quantile function at the value's
    own mid-rank (ties share one), so the values' distribution becomes the reference's and their
    order is kept. `reference`: increasing quantiles at evenly spaced levels from 0 to 1."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or ref.size < 2 or np.any(np.diff(ref) < 0):
        raise ValueError("reference quantiles must be an increasing list of two or more values")
    array = values.numpy().astype(np.float64)
    ordered = np.sort(array)
    ranks = 0.5 * (np.searchsorted(ordered, array, "left") + np.searchsorted(ordered, array, "right"))
    levels = ranks / max(1, array.size)
    matched = np.interp(levels, np.linspace(0.0, 1.0, ref.size), ref)
    return torch.from_numpy(matched.astype(np.float32))


def canvas_input(image: np.ndarray, metadata: dict[str, Any], view: str | None = None,
                 pixel_spacing_mm: float | None = None
                 ) -> tuple[torch.Tensor, Placement, np.ndarray]:
    """(1, H, W) canvas tensor in [0, 1], its `Placement`, and the breast mask on the source grid
    (`windowed_breast` placed top-left). A bundle whose `input.intensity` has
    `reference_quantiles` has each breast's windowed values matched to them (`match_quantiles`);
    no bundle shipped so far does. A bundle with another `cell_mask_detector` gets the pixels
    that detector's mask leaves out negated, and that mask as the breast on the source grid
    (no heatmap outside it); no bundle shipped so far does."""
    from pipelines.breast import breast_masks

    height, width = input_size(metadata)
    detector, cells = pectoral_detector(metadata), cell_mask_detector(metadata)
    # a bundle whose cells come from another detector: both masks from one segmentation
    own, other = (breast_masks(np.asarray(image), view, (detector, cells)) if cells != detector
                  else (None, None))
    scaled, inside, placement, mask = windowed_breast(image, metadata, view, pixel_spacing_mm,
                                                      own)
    reference = metadata["input"]["intensity"].get("reference_quantiles")
    if reference is not None and bool(inside.any()):
        scaled = scaled.clone()
        scaled[inside] = match_quantiles(scaled[inside], reference)
    if other is not None:
        mask = other
        scaled = torch.where(inside & ~mask_in_placement(mask, placement), -scaled, scaled)
    canvas = torch.zeros(1, height, width, dtype=torch.float32)
    canvas[0, :placement.height, :placement.width] = scaled
    return canvas, placement, mask

"""The one orientation rule: how a stored mammogram is turned to the model's convention.

Every model bundle sees a breast with the chest wall on the left (as a left breast is displayed)
and, on CC views, the lateral side up (metadata.json: `input.orientation = "chest_wall_left"`).
Training and evaluation (tools/model/, PNG images whose chest-wall side a manifest states or the
pixels show) and the worker (pipelines/study.py, DICOM images whose tags say it) must turn an
image the same way, or the numbers of an evaluation report describe another model than the one
deployed. So both sides only find out two facts about the stored image, where its chest wall is
and whether it is upside down, and this module turns them into flips.

The flips are mirrors, each its own inverse: applying the same `Orientation` to a model-grid
heatmap takes it back to the stored image, and `map_point` moves an annotation with the pixels.

Pure numpy: no DICOM or image-file reading here, and no torch, so the dataset tools and the node's
worker can both import it cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

ScalarT = TypeVar("ScalarT", bound=np.generic)


@dataclass(frozen=True)
class Orientation:
    """Flips that take the stored image to the model's convention (each is its own inverse)."""

    flip_columns: bool  # mirror left-right: the stored chest wall is on the right
    flip_rows: bool  # mirror top-bottom: the stored image is upside down (lateral side down on CC)

    def apply(self, array: npt.NDArray[ScalarT]) -> npt.NDArray[ScalarT]:
        """The flipped 2-D array, contiguous (torch and MONAI refuse negative strides)."""
        if self.flip_columns:
            array = array[:, ::-1]
        if self.flip_rows:
            array = array[::-1, :]
        return np.ascontiguousarray(array)

    def map_point(self, x: float, y: float, shape: tuple[int, int]) -> tuple[float, float]:
        """Pixel coordinates (x = column, y = row) of a point after `apply` on an image of
        `shape` (rows, cols), so annotations move with the pixels."""
        rows, cols = shape
        return (float(cols - 1 - x) if self.flip_columns else float(x),
                float(rows - 1 - y) if self.flip_rows else float(y))


def orientation_for_chest_wall(chest_wall_on_right: bool, upside_down: bool = False) -> Orientation:
    """The convention itself: mirror the columns exactly when the chest wall is on the right,
    the rows exactly when the image is upside down."""
    return Orientation(flip_columns=chest_wall_on_right, flip_rows=upside_down)


def chest_wall_on_right_from_tags(laterality: str, patient_orientation: Sequence[str]) -> bool:
    """Where the chest wall is, from Patient Orientation (row direction, column direction) or,
    without a usable row direction, from the laterality.

    Row direction "P" means the image runs towards the chest wall (posterior) from left to right,
    so the chest wall is on the right; "A" puts it on the left. Without either, a right breast is
    assumed in its standard display, chest wall on the right.
    """
    row_direction, _ = _directions(patient_orientation)
    if row_direction[:1] in ("A", "P"):
        return row_direction.startswith("P")
    return laterality == "R"


def upside_down_from_tags(laterality: str, view: str, patient_orientation: Sequence[str]) -> bool:
    """Whether the rows must be mirrored: column direction "H" (head at the bottom) always; on a
    CC view also when the lateral side is at the bottom, which is column direction "R" for a
    right breast and "L" for a left one (the lateral side belongs at the top)."""
    _, column_direction = _directions(patient_orientation)
    if column_direction.startswith("H"):
        return True
    if view == "CC" and column_direction[:1] in ("L", "R"):
        return column_direction[:1] == laterality
    return False


def orientation_from_tags(
    laterality: str, view: str, patient_orientation: Sequence[str] | None
) -> Orientation:
    """The flips for a DICOM image: its Image Laterality, View Position and Patient Orientation
    (None or anything but two values: unknown, the laterality decides)."""
    directions = patient_orientation or ()
    return orientation_for_chest_wall(
        chest_wall_on_right_from_tags(laterality, directions),
        upside_down_from_tags(laterality, view, directions),
    )


def chest_wall_on_right_from_pixels(pixels: npt.NDArray[np.floating]) -> bool:
    """For images whose chest-wall side nobody recorded (mini-MIAS): the chest wall side carries
    more tissue, so compare the two halves over the middle rows.

    The middle rows skip the film labels in the corners; on mini-MIAS this agrees with the
    left/right pairing of Info.txt on all but a few films filled edge to edge by a large breast.
    """
    rows, cols = pixels.shape
    middle = pixels[rows // 4: 3 * rows // 4]
    return bool(middle[:, cols // 2:].mean() > middle[:, : cols // 2].mean())


def _directions(patient_orientation: Sequence[str]) -> tuple[str, str]:
    """(row direction, column direction), upper case; empty strings unless exactly two values."""
    if len(patient_orientation) != 2:
        return "", ""
    row_direction, column_direction = (str(value).upper() for value in patient_orientation)
    return row_direction, column_direction

"""Findings: the regions of a heatmap at or above an operating point, in source pixel coordinates.

One definition of "a finding" shared by every object that shows one — the TID 1500 region
marks, the Mammography CAD SR's single-image findings, the binary SEG and the Secondary Capture
overlay — so a viewer that shows two of them shows the same regions. Pure numpy/scipy on the
heatmap already mapped back to the source image's exact Rows × Columns (pipelines/model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

MAX_FINDINGS_PER_IMAGE = 3  # a radiologist reads a few marks per image, not a rash
MIN_FINDING_AREA_PX = 16  # smaller islands are noise of the upsampled map, not regions
# ... except the island holding the heatmap's highest pixel: the map's peak is the image's score
# (pipelines/model.py), so an image at or above the threshold always has that finding, however
# little of the map clears the threshold around it


@dataclass(frozen=True)
class Finding:
    """One connected region of the heatmap at or above the threshold.

    Coordinates are DICOM image coordinates of the source: (column, row) with (0, 0) at the
    top-left corner of the top-left pixel, so a pixel's centre is at +0.5 (PS3.3 C.18.6.1.2).
    """

    score: float  # the heatmap's peak inside the region
    peak: tuple[float, float]  # (column, row) of that peak, pixel centre
    centroid: tuple[float, float]  # (column, row), mean of the region's pixel centres
    bounding_box: tuple[int, int, int, int]  # first column, first row, last column, last row
    area_px: int
    mask: npt.NDArray[np.bool_]  # the region on the source grid (Rows × Columns)

    def ellipse(self) -> tuple[tuple[float, float], ...]:
        """Four points of the region's bounding ellipse as SCOORD ELLIPSE wants them:
        the major axis end points, then the minor axis end points (PS3.3 C.18.6.1.2)."""
        first_col, first_row, last_col, last_row = self.bounding_box
        centre_col = (first_col + last_col + 1) / 2.0
        centre_row = (first_row + last_row + 1) / 2.0
        half_width = (last_col - first_col + 1) / 2.0
        half_height = (last_row - first_row + 1) / 2.0
        horizontal = ((centre_col - half_width, centre_row), (centre_col + half_width, centre_row))
        vertical = ((centre_col, centre_row - half_height), (centre_col, centre_row + half_height))
        if half_width >= half_height:
            return horizontal + vertical
        return vertical + horizontal


def find_findings(heatmap: npt.NDArray[np.floating], threshold: float,
                  max_findings: int = MAX_FINDINGS_PER_IMAGE,
                  min_area_px: int = MIN_FINDING_AREA_PX) -> tuple[Finding, ...]:
    """The strongest regions at or above `threshold`, strongest first, at most `max_findings`."""
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (Rows × Columns), got shape {heatmap.shape}")
    above = np.asarray(heatmap >= threshold)
    # Labelled inside the box of the pixels above the threshold only (the heatmap is 0 off the
    # breast): the same regions, numbered in the same (raster) order as on the whole grid, for
    # a fraction of a 13.6 Mpx labelling.
    rows_any, cols_any = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if len(rows_any) == 0:
        return ()
    top, left = int(rows_any[0]), int(cols_any[0])
    window = (slice(top, int(rows_any[-1]) + 1), slice(left, int(cols_any[-1]) + 1))
    above_w, values_w = above[window], heatmap[window]
    labels, count = ndimage.label(above_w)
    if count == 0:
        return ()
    # Statistics inside each candidate's bounding box only: scipy's full-grid reductions
    # (maximum_position, center_of_mass, ...) cost about 2 s per 4096 x 3328 view, the boxes
    # milliseconds. Areas first (one bincount), so specks are never looked at.
    areas = np.bincount(labels[above_w], minlength=count + 1)
    slices = ndimage.find_objects(labels)  # boxes in the window
    top_label = int(labels.flat[int(np.argmax(values_w))])  # the island of the map's peak
    candidates: list[tuple[float, int, tuple[int, int]]] = []  # (peak, label index, position)
    for i, box in enumerate(slices):
        if box is None or (areas[i + 1] < min_area_px and i + 1 != top_label):
            continue
        inside = labels[box] == i + 1
        values = np.where(inside, values_w[box], -np.inf)
        flat = int(np.argmax(values))  # the first maximum in C order when several pixels tie
        row, col = np.unravel_index(flat, inside.shape)
        candidates.append((float(values.flat[flat]), i,
                           (int(row) + box[0].start + top, int(col) + box[1].start + left)))
    candidates.sort(key=lambda candidate: -candidate[0])  # stable: label order among equal peaks
    findings: list[Finding] = []
    for peak, i, (peak_row, peak_col) in candidates[:max_findings]:
        box = slices[i]
        inside = labels[box] == i + 1
        rows = slice(box[0].start + top, box[0].stop + top)
        cols = slice(box[1].start + left, box[1].stop + left)
        box_rows, box_cols = np.nonzero(inside)
        centre_row = float(box_rows.mean()) + rows.start
        centre_col = float(box_cols.mean()) + cols.start
        mask = np.zeros(above.shape, dtype=np.bool_)  # the region on the full grid
        mask[rows, cols] = inside
        findings.append(Finding(
            score=peak,
            peak=(float(peak_col) + 0.5, float(peak_row) + 0.5),
            centroid=(centre_col + 0.5, centre_row + 0.5),
            bounding_box=(cols.start, rows.start, cols.stop - 1, rows.stop - 1),
            area_px=int(areas[i + 1]),
            mask=mask,
        ))
    return tuple(findings)

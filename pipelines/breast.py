"""Breast segmentation: which pixels of a mammogram are breast tissue, for training and worker alike.

Input: a 2-D image already in the bundle's orientation (`pipelines/orientation.py`: chest wall on
the left, lateral side up), bright = dense, any size and bit depth. Output: a boolean mask on the
same grid, True on the breast, False on

- the background: below an Otsu threshold of the smoothed image's log intensities (a percentile floor keeps a
  nearly empty image sane), then the largest connected component with its holes filled;
- film labels and markers: bright blobs not connected to that component;
- the pectoral muscle (MLO views, or views of unknown type): the bright region in the upper-left
  corner, kept only when its right edge fits a line that makes a triangle against the chest wall
  (the line narrows going down and meets the left edge in the upper part of the image);
  detector 2 (`pectoral_detector=2`, a bundle's `input.pectoral_detector`) then searches the
  straight lines from the top edge to the chest wall for the one the brightness falls across
  most steadily, where the row-by-row search found none;
- a border of `border_fraction` of the shorter side all around the image (scanner edges, film
  borders and the chest-wall edge itself carry no lesion the model can localise).

The work is done on a copy reduced to at most `WORK_SIDE` pixels per side and the mask mapped
back to the full grid (nearest cell), so a 4096 x 3328 image costs tens of milliseconds.
numpy and scipy only. `pipelines/preprocess.py:prepare_image` applies it when a bundle's
metadata says `input.breast_mask: true`; `tools/model/dataset.py:oriented_input` applies the
same function to training images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

WORK_SIDE = 512
BORDER_FRACTION = 0.01


def _reduce(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Block mean by an integer factor so that the longer side is at most WORK_SIDE."""
    rows, cols = image.shape
    factor = max(1, int(np.ceil(max(rows, cols) / WORK_SIDE)))
    if factor == 1:
        return image.astype(np.float32, copy=True), 1
    r, c = rows // factor * factor, cols // factor * factor
    small = image[:r, :c].reshape(r // factor, factor, c // factor, factor)
    reduced = small.mean(axis=(1, 3), dtype=np.float32)
    # Edge rows/columns that do not fill a block: repeat the last block row/column.
    pad_r = int(np.ceil(rows / factor)) - reduced.shape[0]
    pad_c = int(np.ceil(cols / factor)) - reduced.shape[1]
    if pad_r or pad_c:
        reduced = np.pad(reduced, ((0, pad_r), (0, pad_c)), mode="edge")
    return reduced, factor


def _smoothed(image: np.ndarray) -> tuple[np.ndarray, int]:
    """The reduced copy the mask is computed on, smoothed; and its reduction factor."""
    reduced, factor = _reduce(image)
    return ndimage.gaussian_filter(reduced, sigma=max(1.0, min(reduced.shape) / 200)), factor


def _expand(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    if factor == 1:
        return mask
    if mask.shape[0] * factor >= shape[0] and mask.shape[1] * factor >= shape[1]:
        # each reduced pixel back to its factor x factor block (~6 x faster than fancy indexing)
        blocks: np.ndarray = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
        return blocks[: shape[0], : shape[1]]
    rows = np.minimum(np.arange(shape[0]) // factor, mask.shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // factor, mask.shape[1] - 1)
    expanded: np.ndarray = mask[np.ix_(rows, cols)]
    return expanded


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The Otsu threshold of a 1-D sample (between-class variance maximised over a histogram)."""
    values = values[np.isfinite(values)]
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    largest: np.ndarray = labels == (int(np.argmax(sizes)) + 1)
    return largest


def tissue_mask(smooth: np.ndarray) -> np.ndarray:
    """Breast vs background and labels on the reduced, smoothed image."""
    floor = float(np.percentile(smooth, 5))
    # Otsu on log intensities: on linear values a digital image's dark fatty tissue falls on the
    # background side (the split is fat vs pectoral muscle); the log spreads the dark end.
    # Values are first put on a 0-255 scale, so the threshold does not depend on the bit depth.
    lowest = float(smooth.min())
    scale = 255.0 / max(float(smooth.max()) - lowest, 1e-6)
    log_level = float(np.expm1(otsu_threshold(np.log1p((smooth - lowest) * scale).ravel()))
                      ) / scale + lowest
    level = max(log_level, floor + 0.02 * (float(smooth.max()) - floor))
    foreground = smooth > level
    # Opening breaks thin bridges between a label and the breast before the largest component.
    opened = ndimage.binary_opening(foreground, structure=np.ones((3, 3), bool), iterations=2)
    breast = _largest_component(opened if opened.any() else foreground)
    filled: np.ndarray = ndimage.binary_fill_holes(breast)
    return filled


PECTORAL_OUTCOMES = ("cut", "no breast", "too few rows", "rows disagree",
                     "not narrowing or not from the top corner", "meets the chest wall out of range",
                     "starts below the top", "faint edge")
PECTORAL_DETECTORS = (1, 2)  # 1: the row-by-row edge search; 2: then the straight-line search
LINE_CUT = "cut by the line search"  # detector 2's outcome when only the line search cut
LINE_OUTCOMES = ("no line", "faint line", "line not brighter")


def _top_and_wall(breast: np.ndarray) -> tuple[int, int]:
    """The breast's top row and its chest-wall column (the median leftmost breast column over
    its top rows: a scanned film may be padded)."""
    rows = breast.shape[0]
    first = int(np.flatnonzero(breast.any(axis=1))[0])
    band = range(first, min(first + max(2, rows // 12), rows))
    wall = int(np.median([np.flatnonzero(breast[r])[0] for r in band if breast[r].any()]))
    return first, wall


def _min_fall(smooth: np.ndarray, breast: np.ndarray) -> float:
    """The fall (intensity per pixel) a pectoral edge must show: a tenth of the breast's 1-99 %
    intensity range spread over 2 % of the image's width (at least 2 pixels)."""
    values = smooth[breast]
    contrast = float(np.percentile(values, 99) - np.percentile(values, 1))
    return 0.1 * contrast / max(2.0, float(smooth.shape[1]) / 100)


def find_pectoral_line(smooth: np.ndarray, breast: np.ndarray) -> tuple[np.ndarray, str]:
    """Detector 2's line search: the pectoral edge as the straight line from the breast's top row
    (8-90 % of the breast's width from the chest wall) down to the chest wall (10-130 % of the
    breast's height below its top: a muscle may run past the bottom) across which brightness
    falls most steadily: the median fall along the line's course through the inner breast,
    weighted by the square root of the share of the breast's height it spans (a long edge over a
    short one of the same steepness). Kept when that median fall is clear (`_min_fall`) and the
    triangle is brighter on average than the band of breast just outside it. 42 x 49 lines of
    160 points, one vectorised pass."""
    rows, cols = smooth.shape
    none = np.zeros_like(breast)
    first, wall = _top_and_wall(breast)
    last = int(np.flatnonzero(breast.any(axis=1))[-1])
    height = last - first + 1
    width = int(breast.sum(axis=1).max())
    inner = ndimage.binary_erosion(breast, iterations=max(2, cols // 60))
    g_row = ndimage.sobel(smooth, axis=0) / 4  # sobel's weights sum to 4 per unit step
    g_col = ndimage.sobel(smooth, axis=1) / 4
    x0 = (np.linspace(0.08, 0.9, 42) * width)[:, None, None]  # at the top row, from the wall
    reach = (np.linspace(0.10, 1.3, 49) * height)[None, :, None]  # where it meets the wall
    t = np.linspace(0.0, 1.0, 160)[None, None, :]
    r_idx = np.round(first + t * reach).astype(int)
    c_idx = np.round(wall + x0 * (1 - t)).astype(int)
    valid = (r_idx < rows) & (c_idx >= 0) & (c_idx < cols)
    r_idx, c_idx = np.minimum(r_idx, rows - 1), np.clip(c_idx, 0, cols - 1)
    valid &= inner[r_idx, c_idx]
    # the fall across the line, along its normal pointing away from the top-left corner
    fall = -(g_row[r_idx, c_idx] * x0 + g_col[r_idx, c_idx] * reach) / np.hypot(x0, reach)
    enough = valid.sum(axis=2, keepdims=True) >= 20
    samples = np.where(valid & enough, fall, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lines with no sample: all NaN
        median = np.nanmedian(samples, axis=2)
    score = median * np.sqrt(np.minimum(reach[..., 0], last - first) / height)
    if not np.isfinite(score).any():
        return none, "no line"
    i, j = np.unravel_index(int(np.nanargmax(score)), score.shape)
    if median[i, j] < _min_fall(smooth, breast):
        return none, "faint line"
    top_col, bottom_row = float(x0[i, 0, 0]), first + float(reach[0, j, 0])
    grid_r, grid_c = np.mgrid[0:rows, 0:cols]
    line_col = wall + top_col * (1 - (grid_r - first) / (bottom_row - first))
    triangle: np.ndarray = (grid_c < line_col) & breast
    beside = ((grid_c >= line_col) & (grid_c < line_col + 0.15 * width) & breast
              & (grid_r <= min(bottom_row, last)))
    if not triangle.any() or not beside.any() or smooth[triangle].mean() <= smooth[beside].mean():
        return none, "line not brighter"
    return triangle, LINE_CUT


def find_pectoral(smooth: np.ndarray, breast: np.ndarray, detector: int = 1
                  ) -> tuple[np.ndarray, str]:
    """The pectoral muscle as a triangle in the upper-left corner, or all False if none fits,
    with the outcome: "cut", or which test the edge failed (`PECTORAL_OUTCOMES`); with
    `detector` 2, where that fails, `find_pectoral_line`'s triangle and outcome (`LINE_CUT` or
    `LINE_OUTCOMES`).

    The muscle's edge is the strongest drop of brightness going away from the chest wall: in each
    of the breast's upper 60 % rows, the column of the steepest fall within the inner breast's
    left 60 %. A line through those columns (RANSAC, fixed seed, then least squares on its
    inliers) must carry a quarter of the rows from the top down, narrow going down, start within
    5-70 % of the width from the chest wall (the breast's leftmost column over its top rows: a
    scanned film may be padded) and meet it within 8-85 % of the height, and the fall across it
    must be clear (a tenth of the breast's intensity range). The muscle is then every breast
    pixel left of the line."""
    return find_pectorals(smooth, breast, (detector,))[0]


def find_pectorals(smooth: np.ndarray, breast: np.ndarray, detectors: Sequence[int]
                   ) -> list[tuple[np.ndarray, str]]:
    """`find_pectoral` for each of `detectors`, the row-by-row search (detector 1's, and
    detector 2's first) run once."""
    for detector in detectors:
        if detector not in PECTORAL_DETECTORS:
            raise ValueError(f"pectoral detector {detector!r}: one of {PECTORAL_DETECTORS}")
    if breast.sum() < 100:
        return [(np.zeros_like(breast), "no breast") for _ in detectors]
    rows = _find_pectoral_rows(smooth, breast)
    line: tuple[np.ndarray, str] | None = None
    found = []
    for detector in detectors:
        if rows[1] == "cut" or detector == 1:
            found.append(rows)
            continue
        if line is None:
            line = find_pectoral_line(smooth, breast)
        found.append(line)
    return found


def _find_pectoral_rows(smooth: np.ndarray, breast: np.ndarray) -> tuple[np.ndarray, str]:
    """Detector 1 (`find_pectoral`'s first search) on a breast of 100 pixels or more."""
    rows, cols = smooth.shape
    none = np.zeros_like(breast)
    first, wall = _top_and_wall(breast)
    inner = ndimage.binary_erosion(breast, iterations=max(2, cols // 60))  # off the skin line
    fall = -ndimage.sobel(smooth, axis=1)  # > 0 where brightness drops going right
    reach = wall + int(0.6 * cols)
    found_rows, found_cols, strength = [], [], []
    for r in range(first, min(first + int(0.6 * rows), rows)):
        allowed = np.flatnonzero(inner[r, wall + 1:reach]) + wall + 1
        if len(allowed) < 3:
            continue
        best = allowed[int(np.argmax(fall[r, allowed]))]
        found_rows.append(r)
        found_cols.append(best - wall)
        strength.append(fall[r, best])
    if len(found_rows) < max(5, rows // 20):
        return none, "too few rows"
    r_arr = np.asarray(found_rows, np.float64)
    c_arr = np.asarray(found_cols, np.float64)
    tolerance = 0.03 * cols
    rng = np.random.default_rng(0)
    best_inliers = np.zeros(len(r_arr), bool)
    for _ in range(300):
        a, b = rng.choice(len(r_arr), 2, replace=False)
        if r_arr[a] == r_arr[b]:
            continue
        slope = (c_arr[b] - c_arr[a]) / (r_arr[b] - r_arr[a])
        if slope >= 0:
            continue
        inliers = np.abs(c_arr - (c_arr[a] + slope * (r_arr - r_arr[a]))) < tolerance
        if inliers.sum() > best_inliers.sum():
            best_inliers = inliers
    if best_inliers.sum() < max(5, len(r_arr) // 4):
        return none, "rows disagree"
    slope, intercept = np.polyfit(r_arr[best_inliers] - first, c_arr[best_inliers], 1)
    if slope >= 0 or not 0.05 * cols <= intercept <= 0.7 * cols:
        return none, "not narrowing or not from the top corner"
    apex = first - intercept / slope
    if not 0.08 * rows <= apex <= 0.85 * rows:
        return none, "meets the chest wall out of range"
    if r_arr[best_inliers].min() > first + 0.15 * rows:  # the edge must start at the top
        return none, "starts below the top"
    # sobel's weights sum to 4 per unit step per pixel: the median fall, in intensity per pixel
    if float(np.median(np.asarray(strength)[best_inliers])) / 4 < _min_fall(smooth, breast):
        return none, "faint edge"
    grid_r, grid_c = np.mgrid[0:rows, 0:cols]
    triangle: np.ndarray = (grid_c < wall + intercept + slope * (grid_r - first)) & breast
    return triangle, "cut"


def pectoral_outcome(image: np.ndarray, detector: int = 1) -> str:
    """How `breast_mask(image, "MLO", pectoral_detector=detector)`'s pectoral search ended on an
    image (chest wall left): "cut", `LINE_CUT` or the failed test (for measuring the detector;
    the mask is `breast_mask`'s; `segment_breast` gives both, for several detectors at once)."""
    smooth, _ = _smoothed(np.asarray(image))
    return find_pectoral(smooth, tissue_mask(smooth), detector)[1]


def breast_mask(image: np.ndarray, view: str | None = None,
                border_fraction: float = BORDER_FRACTION, pectoral_detector: int = 1
                ) -> np.ndarray:
    """Boolean mask of the breast on the image's grid (chest wall on the left).

    `view`: "MLO" (pectoral removed when one is found), "CC" (not looked for) or None
    (unknown: looked for, removed only when the triangle test passes). `pectoral_detector`:
    1 or 2 (`find_pectoral`), as the bundle declares it (`pipelines.preprocess.pectoral_detector`)."""
    return breast_masks(image, view, (pectoral_detector,), border_fraction)[0]


def breast_masks(image: np.ndarray, view: str | None, pectoral_detectors: Sequence[int],
                 border_fraction: float = BORDER_FRACTION) -> list[np.ndarray]:
    """`breast_mask` for each pectoral detector, the breast segmented once."""
    if (view or "").upper() == "CC":  # no muscle looked for: the whole breast, once per detector
        whole = _segment(image, (), border_fraction)[0]
        return [whole() for _ in pectoral_detectors]
    return _segment(image, pectoral_detectors, border_fraction)[1]


def segment_breast(image: np.ndarray, pectoral_detectors: Sequence[int],
                   border_fraction: float = BORDER_FRACTION
                   ) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """For measuring the pectoral detectors, the image segmented once: the whole breast (a CC
    view's mask, no muscle looked for), each detector's MLO mask (`breast_mask`'s) and how each
    detector's search ended (`pectoral_outcome`'s)."""
    whole, masks, outcomes = _segment(image, pectoral_detectors, border_fraction)
    return whole(), masks, outcomes


def _segment(image: np.ndarray, pectoral_detectors: Sequence[int], border_fraction: float
             ) -> tuple[Callable[[], np.ndarray], list[np.ndarray], list[str]]:
    """The whole breast's mask (made when called: the worker's MLO views never need it) and, per
    pectoral detector, the mask without the muscle and the search's outcome; on the image's
    grid with the border cleared."""
    array = np.asarray(image)  # any dtype: only the reduced copy is float32
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {array.shape}")
    smooth, factor = _smoothed(array)
    tissue = tissue_mask(smooth)
    border = max(1, int(round(border_fraction * min(array.shape))))

    def full(breast: np.ndarray) -> np.ndarray:
        expanded = _expand(breast, factor, array.shape)
        if expanded is tissue:  # not reduced, no pectoral cut: the tissue mask itself
            expanded = expanded.copy()
        expanded[:border, :] = False
        expanded[-border:, :] = False
        expanded[:, :border] = False
        expanded[:, -border:] = False
        return expanded

    found = find_pectorals(smooth, tissue, pectoral_detectors) if pectoral_detectors else []
    masks = [full(_largest_component(tissue & ~triangle)) for triangle, _ in found]
    return (lambda: full(tissue)), masks, [outcome for _, outcome in found]


def mask_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with every pixel outside the mask set to the background level (the 1st
    percentile of the pixels outside it, or the image minimum if there are none)."""
    array = np.asarray(image, dtype=np.float32)
    outside = ~mask
    if not outside.any():
        return array.copy()
    level = float(np.percentile(array[outside], 1))
    return np.where(mask, array, np.float32(level)).astype(np.float32)


def apply_breast_mask(image: np.ndarray, view: str | None = None, pectoral_detector: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(the image with the background level outside the breast, the breast mask): what training
    (`tools/model/dataset.py:oriented_input`) and the worker (`pipelines/preprocess.py:
    prepare_image`) feed a bundle with `input.breast_mask`."""
    mask = breast_mask(image, view, pectoral_detector=pectoral_detector)
    return mask_image(image, mask), mask

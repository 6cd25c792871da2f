"""Does a 4-view exam's score come from its content or from how it was acquired and stored?

    python -m tools.model.domain --bundle models/mias-baseline --exam ../shared/data/ffdm-exam \
        --pixel-spacing 0.11

`--exam` holds L-CC.png, L-MLO.png, R-CC.png and R-MLO.png (8- or 16-bit grayscale, bright =
dense, every breast chest wall left, as the model sees it). The exam is scored as the worker
scores a study (`ModelRunner.predict`: breast crop, resampling to the bundle's pixel size from the
given one, both breasts of each view together) as given, then under changes of storage and of
acquisition that leave the breast itself unchanged:

- storage: the same pixels scaled to 16 bits; half the resolution (2 x 2 means) at twice the
  pixel size. A bundle that windows each breast on its own pixels and resamples it to a fixed
  pixel size must give the same scores;
- film-like: each image blurred to the sharpness of a scanned film at the bundle's pixel size
  (Gaussian, sigma = one model pixel) and with a lighter fatty background (gamma 0.6 on the
  breast's own 0.5-99.5 % window), the two main visible differences between processed digital
  images and digitised film;
- pixel size: the stated pixel size 20 % smaller and 25 % larger (a PNG carries no pixel size,
  and a wrong one changes the breast's scale on the model's grid).

For the exam as given, the tool also says where each view's heatmap peaks and how much of the
breast is at or above the operating point.

A score above the operating point that stays there under every change is driven by the image's
content (a finding, or anatomy the training data did not show); one that moves across the
operating point with the storage or the pixel size is driven by the domain. One exam is an
anecdote, not a measurement: read it with the bundle's card."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.results import SCREENING_VIEWS


def load_exam(folder: Path) -> list[np.ndarray]:
    """The four views (`SCREENING_VIEWS` order) as float32 arrays."""
    images = []
    for view_key in SCREENING_VIEWS:
        pixels = np.asarray(Image.open(folder / f"{view_key}.png"))
        if pixels.ndim == 3:
            pixels = pixels[..., 0]
        images.append(pixels.astype(np.float32))
    return images


def half_resolution(image: np.ndarray) -> np.ndarray:
    rows, cols = (n // 2 * 2 for n in image.shape)
    return image[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean((1, 3))


def film_like(image: np.ndarray, spacing_mm: float, model_spacing_mm: float) -> np.ndarray:
    """Gaussian blur of one model pixel, then gamma 0.6 inside the breast's 0.5-99.5 % window
    (brighter fat), rescaled to the image's original range."""
    from scipy import ndimage

    from pipelines.breast import breast_mask

    sigma = model_spacing_mm / spacing_mm
    blurred = ndimage.gaussian_filter(image.astype(np.float64), sigma)
    mask = breast_mask(image)
    low, high = np.percentile(blurred[mask], [0.5, 99.5]) if mask.any() else (0.0, 1.0)
    unit = np.clip((blurred - low) / max(high - low, 1e-6), 0.0, 1.0) ** 0.6
    out = np.where(mask, low + unit * (high - low), image)
    return out.astype(np.float32)


def predict_exam(runner: Any, images: list[np.ndarray], spacing_mm: float) -> list[Any]:
    """The four views scored together, as the worker scores a study (each breast read against
    the same view of the other)."""
    views = [key.split("-")[1] for key in SCREENING_VIEWS]
    other = [SCREENING_VIEWS.index(("R" if key[0] == "L" else "L") + key[1:])
             for key in SCREENING_VIEWS]
    return list(runner.predict(images, views, [spacing_mm] * len(images), other))


def score_exam(runner: Any, images: list[np.ndarray], spacing_mm: float) -> dict[str, float]:
    return {key: round(float(p.probability), 4)
            for key, p in zip(SCREENING_VIEWS, predict_exam(runner, images, spacing_mm),
                              strict=True)}


def peaks(runner: Any, images: list[np.ndarray], spacing_mm: float, point: float
          ) -> dict[str, dict[str, float]]:
    """Where each view's heatmap peaks (mm from the chest wall, the breast's leftmost pixel in the
    peak's row; height as a fraction of the image's from the top) and how much of the breast is
    at or above the operating point (the findings' area)."""
    from pipelines.breast import breast_mask

    out = {}
    for key, image, prediction in zip(SCREENING_VIEWS, images,
                                      predict_exam(runner, images, spacing_mm), strict=True):
        heatmap = np.asarray(prediction.heatmap)
        row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        breast = breast_mask(image, key.split("-")[1])
        inside = np.flatnonzero(breast[row])
        wall = int(inside[0]) if len(inside) else 0
        out[key] = {"score": round(float(prediction.probability), 4),
                    "peak_mm_from_chest_wall": round((int(col) - wall) * spacing_mm, 1),
                    "peak_height": round(float(row) / heatmap.shape[0], 3),
                    "breast_at_or_above_point": round(
                        float((heatmap[breast] >= point).mean()) if breast.any() else 0.0, 4)}
    return out


def variants(images: list[np.ndarray], spacing_mm: float, model_spacing_mm: float
             ) -> list[tuple[str, list[np.ndarray], float]]:
    peak = max(float(image.max()) for image in images)
    to_sixteen = 65535.0 / max(peak, 1.0)
    return [
        ("as given", images, spacing_mm),
        ("storage: 16-bit", [np.round(i * to_sixteen) for i in images], spacing_mm),
        ("storage: half resolution", [half_resolution(i) for i in images], 2 * spacing_mm),
        ("film-like (blur + gamma 0.6)",
         [film_like(i, spacing_mm, model_spacing_mm) for i in images], spacing_mm),
        ("pixel size -20 %", images, 0.8 * spacing_mm),
        ("pixel size +25 %", images, 1.25 * spacing_mm),
    ]


def main(argv: list[str] | None = None) -> int:
    from pipelines.model import load_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--exam", required=True, type=Path)
    parser.add_argument("--pixel-spacing", type=float, required=True,
                        help="mm per pixel of the PNGs (they carry none)")
    args = parser.parse_args(argv)
    runner = load_bundle(args.bundle, "cpu")
    point = float(runner.metadata["operating_points"]["balanced"])
    model_spacing = float(runner.metadata["input"].get("pixel_spacing_mm") or args.pixel_spacing)
    images = load_exam(args.exam)
    rows = []
    for name, pixels, spacing in variants(images, args.pixel_spacing, model_spacing):
        scores = score_exam(runner, pixels, spacing)
        rows.append({"variant": name, "pixel_spacing_mm": round(spacing, 4), **scores,
                     "above_balanced": [k for k, v in scores.items() if v >= point]})
    print(f"bundle {runner.metadata.get('name')} {runner.metadata.get('version')}, balanced "
          f"operating point {point:.3f}", file=sys.stderr)
    print("| variant | pixel mm | " + " | ".join(SCREENING_VIEWS) + " | above the point |")
    print("|---|---|" + "---|" * len(SCREENING_VIEWS) + "---|")
    for row in rows:
        print(f"| {row['variant']} | {row['pixel_spacing_mm']} | "
              + " | ".join(f"{row[k]:.3f}" for k in SCREENING_VIEWS)
              + f" | {', '.join(row['above_balanced']) or 'none'} |")
    located = peaks(runner, images, args.pixel_spacing, point)
    print("\nAs given, where each view's heatmap peaks:\n")
    print("| view | score | peak, mm from the chest wall | peak height (from the top) | breast "
          "at or above the point |")
    print("|---|---|---|---|---|")
    for key, where in located.items():
        print(f"| {key} | {where['score']:.3f} | {where['peak_mm_from_chest_wall']:.0f} | "
              f"{100 * where['peak_height']:.0f} % | "
              f"{100 * where['breast_at_or_above_point']:.1f} % |")
    print(json.dumps({"bundle": runner.metadata.get("version"), "operating_point": point,
                      "rows": rows, "peaks": located}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A tiny learnable PNG data set, so training and export tests need no real mammograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tools.model.dataset import Lesion, Record, write_manifest


def write_synthetic(folder: str | Path, women: int = 16, size: int = 128,
                    seed: int = 0) -> Path:
    """A tiny learnable data set for smoke tests (no real data): 8-bit PNGs of a bright
    half-disc "breast" on dark film, two images per woman; every other woman has one bright
    blob "lesion" in her left image (every fourth malignant). Returns the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    records = []
    for woman in range(women):
        for side in ("L", "R"):
            breast = xx < 0.7 * size - 0.3 * np.abs(yy - size / 2)
            pixels = np.where(breast, 100.0, 5.0) + rng.normal(0, 8, (size, size))
            abnormal = woman % 2 == 0 and side == "L"
            lesions: tuple[Lesion, ...] = ()
            if abnormal:
                cx, cy = rng.uniform(0.15, 0.45) * size, rng.uniform(0.25, 0.75) * size
                sigma = size / 20
                pixels += 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
                lesions = (Lesion(float(cx), float(cy), float(2 * sigma)),)
            image = np.clip(pixels, 0, 255).astype(np.uint8)
            if side == "R":  # stored with the chest wall on the right, as a right MLO
                image = np.ascontiguousarray(image[:, ::-1])
                lesions = tuple(Lesion(size - 1 - le.x, le.y, le.r) for le in lesions)
            path = folder / f"syn{woman:03d}{side}.png"
            Image.fromarray(image).save(path)
            records.append(Record(
                id=f"syn{woman:03d}{side}", image=path, group=f"syn-{woman:03d}",
                laterality=side, view="MLO", label=int(abnormal),
                malignant=int(abnormal and woman % 4 == 0),
                chest_wall="right" if side == "R" else "left", lesions=lesions,
                pixel_spacing_mm=0.2,
            ))
    manifest = folder / "manifest.jsonl"
    write_manifest(manifest, records)
    return manifest

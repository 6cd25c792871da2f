"""Dataset manifests for the ML tools, and the mini-MIAS adapter.

A manifest is JSON lines, one object per image (see `Record`); image and mask paths are absolute
or relative to the manifest's folder. Folds and splits are grouped by `group` (one woman), so a
woman's two breasts never sit on both sides of a split, and stratified by the group's worst label
(malignant / benign only / normal).

    python -m tools.dataset mias ../shared/data/mias --out manifest.jsonl

No torch import here: EVAL and the tests use this module without loading a network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIAS_SIZE = 1024
MIAS_SPACING_MM = 0.2


@dataclass(frozen=True)
class Lesion:
    """A lesion circle in pixel coordinates of the STORED image (origin top-left, y down)."""

    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    group: str
    laterality: str  # "L" | "R"
    view: str  # "MLO" | "CC"
    label: int  # 1 = abnormality needing work-up (benign or malignant)
    malignant: int | None
    chest_wall: str  # "left" | "right": side of the stored image where the chest wall is
    lesions: tuple[Lesion, ...] = ()
    mask: Path | None = None
    pixel_spacing_mm: float | None = None
    flip_rows: bool = False  # added field: stored image is upside down (lateral side down on CC)


# ----------------------------------------------------------------------------- manifest I/O

def _resolve(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else (base / path).resolve()


def _record_from_json(obj: dict[str, Any], base: Path, line: int) -> Record:
    try:
        label = int(obj["label"])
        malignant = obj.get("malignant")
        record = Record(
            id=str(obj["id"]),
            image=_resolve(str(obj["image"]), base) or Path(),
            group=str(obj["group"]),
            laterality=str(obj["laterality"]).upper(),
            view=str(obj["view"]).upper(),
            label=label,
            malignant=None if malignant is None else int(malignant),
            chest_wall=str(obj["chest_wall"]).lower(),
            lesions=tuple(Lesion(float(d["x"]), float(d["y"]), float(d["r"]))
                          for d in obj.get("lesions") or ()),
            mask=_resolve(obj.get("mask"), base),
            pixel_spacing_mm=None if obj.get("pixel_spacing_mm") is None
            else float(obj["pixel_spacing_mm"]),
            flip_rows=bool(obj.get("flip_rows", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"manifest line {line}: {error!r}") from None
    if record.label not in (0, 1) or record.malignant not in (0, 1, None):
        raise ValueError(f"manifest line {line}: label/malignant must be 0 or 1")
    if record.laterality not in ("L", "R") or record.chest_wall not in ("left", "right"):
        raise ValueError(f"manifest line {line}: laterality L|R and chest_wall left|right")
    return record


def read_manifest(path: str | Path) -> list[Record]:
    """Records with absolute image (and mask) paths; blank lines and '#' lines are skipped."""
    path = Path(path)
    base = path.resolve().parent
    records = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        records.append(_record_from_json(json.loads(text), base, number))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids")
    return records


def _relative_or_absolute(path: Path, base: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def record_to_json(record: Record, base: Path | None = None) -> dict[str, Any]:
    def as_text(p: Path | None) -> str | None:
        if p is None:
            return None
        return _relative_or_absolute(p, base) if base is not None else str(p)

    obj: dict[str, Any] = {
        "id": record.id, "image": as_text(record.image), "group": record.group,
        "laterality": record.laterality, "view": record.view, "label": record.label,
        "malignant": record.malignant, "chest_wall": record.chest_wall,
        "lesions": [{"x": le.x, "y": le.y, "r": le.r} for le in record.lesions],
        "mask": as_text(record.mask), "pixel_spacing_mm": record.pixel_spacing_mm,
    }
    if record.flip_rows:
        obj["flip_rows"] = True
    return obj


def write_manifest(path: str | Path, records: Iterable[Record]) -> None:
    """Paths inside the manifest's folder are written relative to it, others absolute."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    lines = [json.dumps(record_to_json(r, base)) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# ----------------------------------------------------------------------------- pixels

def load_pixels(record: Record) -> np.ndarray:
    """The stored image as 2-D float32 (PNG 8- or 16-bit, any PIL-readable format)."""
    from PIL import Image

    with Image.open(record.image) as opened:
        image = opened.convert("L") if opened.mode in ("RGB", "RGBA", "P", "LA") else opened
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{record.image}: expected a 2-D grey image, got {pixels.shape}")
    return pixels


def chest_wall_on_right(pixels: np.ndarray) -> bool:
    """The chest wall side carries more tissue: compare the two halves over the middle rows.

    The middle rows skip the film labels in the corners; on mini-MIAS this agrees with the
    left/right pairing of Info.txt on all but a few films filled edge to edge by a large breast.
    """
    rows, cols = pixels.shape
    middle = pixels[rows // 4: 3 * rows // 4]
    return bool(middle[:, cols // 2:].mean() > middle[:, : cols // 2].mean())


def to_model_orientation(pixels: np.ndarray, record: Record) -> np.ndarray:
    """Chest wall on the left (the bundle convention, as pipelines/study.py does for DICOM):
    mirror columns when the record's chest wall is on the right; flip rows only when the record
    says so (`flip_rows`)."""
    out = pixels
    if record.chest_wall == "right":
        out = out[:, ::-1]
    if record.flip_rows:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


def lesions_in_model_orientation(record: Record, shape: tuple[int, int]) -> tuple[Lesion, ...]:
    """The record's lesion circles mirrored like `to_model_orientation` mirrors its pixels;
    `shape` is the stored image's (rows, cols)."""
    rows, cols = shape
    out = []
    for lesion in record.lesions:
        x = cols - 1 - lesion.x if record.chest_wall == "right" else lesion.x
        y = rows - 1 - lesion.y if record.flip_rows else lesion.y
        out.append(Lesion(float(x), float(y), lesion.r))
    return tuple(out)


# ----------------------------------------------------------------------------- MIAS

def _parse_mias_info(path: Path) -> dict[str, dict[str, Any]]:
    """Info.txt: one row per abnormality; y has its origin at the bottom-left (row = 1024 - y)."""
    cases: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("mdb"):
            continue
        case = cases.setdefault(parts[0], {"label": 0, "malignant": 0, "lesions": []})
        if parts[2] != "NORM":
            case["label"] = 1
            if len(parts) > 3 and parts[3] == "M":
                case["malignant"] = 1
            if len(parts) >= 7:
                try:
                    x, y, r = float(parts[4]), float(parts[5]), float(parts[6])
                except ValueError:
                    continue
                case["lesions"].append(Lesion(x, MIAS_SIZE - y, r))
    return cases


def mias_records(mias_dir: str | Path) -> list[Record]:
    """mini-MIAS as records: pairs mdb001/mdb002 form one group (woman); the chest wall side
    comes from the pixels (`chest_wall_on_right`); laterality from the reference number (odd =
    right breast: on 319 of the 322 films the chest wall is then on the right, the display
    convention the worker assumes for a right breast; the pairing, not the pixels, is the truth)."""
    mias_dir = Path(mias_dir).resolve()
    cases = _parse_mias_info(mias_dir / "Info.txt")
    records = []
    for ref in sorted(cases):
        case = cases[ref]
        image = mias_dir / f"{ref}.png"
        probe = Record(ref, image, "", "L", "MLO", 0, 0, "left")
        right = chest_wall_on_right(load_pixels(probe))
        number = int(ref[3:])
        records.append(Record(
            id=ref, image=image, group=f"mias-{(number + 1) // 2:03d}",
            laterality="R" if number % 2 == 1 else "L", view="MLO", label=case["label"],
            malignant=case["malignant"], chest_wall="right" if right else "left",
            lesions=tuple(case["lesions"]), mask=None, pixel_spacing_mm=MIAS_SPACING_MM,
        ))
    return records


# ----------------------------------------------------------------------------- folds and splits

def _group_strata(records: Sequence[Record]) -> dict[str, int]:
    """Group -> 2 (any malignant image), 1 (abnormal, benign only), 0 (normal)."""
    strata: dict[str, int] = {}
    for record in records:
        level = 2 if record.malignant == 1 else int(record.label == 1)
        strata[record.group] = max(strata.get(record.group, 0), level)
    return strata


def _shuffled_groups_by_stratum(records: Sequence[Record], seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    strata = _group_strata(records)
    out = []
    for level in (2, 1, 0):
        groups = sorted(g for g, s in strata.items() if s == level)
        out.append([groups[i] for i in rng.permutation(len(groups))])
    return out


def grouped_folds(records: Sequence[Record], k: int = 5, seed: int = 0) -> list[list[int]]:
    """Record indices of each test fold: groups dealt round-robin within each stratum (the
    deal continues across strata, so fold sizes stay balanced)."""
    if k < 2:
        raise ValueError("k must be at least 2")
    fold_of_group: dict[str, int] = {}
    position = 0
    for groups in _shuffled_groups_by_stratum(records, seed):
        for group in groups:
            fold_of_group[group] = position % k
            position += 1
    folds: list[list[int]] = [[] for _ in range(k)]
    for index, record in enumerate(records):
        folds[fold_of_group[record.group]].append(index)
    return folds


def split_groups(records: Sequence[Record], fractions: Sequence[float],
                 seed: int = 0) -> list[list[int]]:
    """Record indices per part, grouped and stratified; fractions of groups per stratum
    (largest remainder rounding, so each stratum's counts add up)."""
    total = float(sum(fractions))
    if total <= 0 or any(f < 0 for f in fractions):
        raise ValueError("fractions must be non-negative with a positive sum")
    part_of_group: dict[str, int] = {}
    for groups in _shuffled_groups_by_stratum(records, seed):
        n = len(groups)
        exact = [n * f / total for f in fractions]
        counts = [int(np.floor(e)) for e in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
            counts[i] += 1
        start = 0
        for part, count in enumerate(counts):
            for group in groups[start:start + count]:
                part_of_group[group] = part
            start += count
    parts: list[list[int]] = [[] for _ in fractions]
    for index, record in enumerate(records):
        parts[part_of_group[record.group]].append(index)
    return parts


def split_70_15_15(records: Sequence[Record],
                   seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) record indices: 70/15/15 % of the groups of each stratum."""
    train, val, test = split_groups(records, (0.70, 0.15, 0.15), seed)
    return train, val, test


# ----------------------------------------------------------------------------- synthetic

def write_synthetic(folder: str | Path, women: int = 16, size: int = 128,
                    seed: int = 0) -> Path:
    """A tiny learnable data set for smoke tests (no real data): 8-bit PNGs of a bright
    half-disc "breast" on dark film, two images per woman; every other woman has one bright
    blob "lesion" in her left image (every fourth malignant). Returns the manifest path."""
    from PIL import Image

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


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a dataset manifest (JSON lines).")
    sub = parser.add_subparsers(dest="command", required=True)
    mias = sub.add_parser("mias", help="mini-MIAS folder (Info.txt + mdbNNN.png) -> manifest")
    mias.add_argument("mias_dir", type=Path)
    mias.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.mias_dir / "Info.txt").is_file():
        print(f"{args.mias_dir}: Info.txt not found", file=sys.stderr)
        return 2
    records = mias_records(args.mias_dir)
    write_manifest(args.out, records)
    print(f"{len(records)} records ({sum(r.label for r in records)} abnormal, "
          f"{sum(r.malignant == 1 for r in records)} malignant, "
          f"{len({r.group for r in records})} groups) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

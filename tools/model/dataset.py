"""Dataset manifests for the ML tools, and the mini-MIAS adapter.

A manifest is JSON lines, one object per image (see `Record`); image and mask paths are absolute
or relative to the manifest's folder. Images are PNG (or any PIL-readable format) or DICOM files
(`mammo-node export-training` writes de-identified DICOM with such a manifest; keys other than
the `Record` fields, like its `node_*` scores, are ignored here). Folds and splits are grouped
by `group` (one woman), so a woman's two breasts never sit on both sides of a split, and
stratified by the group's worst label (malignant / benign only / normal).

    python -m tools.model.dataset mias ../shared/data/mias --out manifest.jsonl

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

from pipelines.orientation import (
    Orientation,
    chest_wall_on_right_from_pixels,
    orientation_for_chest_wall,
)

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
    # for subgroup metrics only (never a model input): breast density as the dataset codes it
    # (mini-MIAS background tissue: F fatty, G fatty-glandular, D dense-glandular) and the
    # classes of the image's findings (mini-MIAS: CALC, CIRC, SPIC, MISC, ARCH, ASYM)
    density: str | None = None
    findings: tuple[str, ...] = ()


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
            density=None if obj.get("density") is None else str(obj["density"]),
            findings=tuple(str(f) for f in obj.get("findings") or ()),
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
    if record.density is not None:
        obj["density"] = record.density
    if record.findings:
        obj["findings"] = list(record.findings)
    return obj


def write_manifest(path: str | Path, records: Iterable[Record]) -> None:
    """Paths inside the manifest's folder are written relative to it, others absolute."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    lines = [json.dumps(record_to_json(r, base)) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# ----------------------------------------------------------------------------- pixels

def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (the "DICM" prefix), whatever its name."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def load_dicom_pixels(path: Path) -> np.ndarray:
    """A single-frame grey DICOM image as stored (no flips), float32, MONOCHROME2 sense: the
    worker's decoding (pipelines/study.py `decode_view`: MONOCHROME1 inverted over Bits Stored,
    no rescale or window), so a model trains on what it will be given. Its orientation comes
    from the record's `chest_wall` and `flip_rows`, which `mammo-node export-training` derives
    from the image's tags with pipelines/orientation.py's rule."""
    from pydicom import dcmread

    ds = dcmread(path)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError(f"{path}: expected a single-frame grey image")
    pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        pixels = np.float32(2**bits - 1) - pixels
    return pixels


def load_pixels(record: Record) -> np.ndarray:
    """The stored image as 2-D float32: a DICOM file (`load_dicom_pixels`), or PNG 8- or 16-bit
    (any PIL-readable format)."""
    if is_dicom(record.image):
        pixels = load_dicom_pixels(record.image)
        if pixels.ndim != 2:
            raise ValueError(f"{record.image}: expected a 2-D grey image, got {pixels.shape}")
        return pixels
    from PIL import Image

    with Image.open(record.image) as opened:
        image = opened.convert("L") if opened.mode in ("RGB", "RGBA", "P", "LA") else opened
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{record.image}: expected a 2-D grey image, got {pixels.shape}")
    return pixels


def record_orientation(record: Record) -> Orientation:
    """The flips that take the record's stored image to the bundle convention (chest wall left):
    pipelines/orientation.py's rule, the one the worker applies to a DICOM view, fed with the
    record's `chest_wall` and `flip_rows` instead of DICOM tags."""
    return orientation_for_chest_wall(record.chest_wall == "right", record.flip_rows)


def to_model_orientation(pixels: np.ndarray, record: Record) -> np.ndarray:
    """The record's pixels turned chest wall left (`record_orientation`)."""
    return record_orientation(record).apply(pixels)


def oriented_input(record: Record, pixels: np.ndarray, breast_mask: bool = False
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """The record's pixels turned chest wall left and, with `breast_mask`, segmented as the
    worker segments them for a bundle with `input.breast_mask` (pipelines/breast.py:
    `apply_breast_mask`: background level outside the breast, pectoral removed unless the record
    is a CC view); the mask (oriented grid) or None."""
    oriented = to_model_orientation(pixels, record)
    if not breast_mask:
        return oriented, None
    from pipelines.breast import apply_breast_mask

    return apply_breast_mask(oriented, record.view)


def lesions_in_model_orientation(record: Record, shape: tuple[int, int]) -> tuple[Lesion, ...]:
    """The record's lesion circles moved like `to_model_orientation` moves its pixels;
    `shape` is the stored image's (rows, cols)."""
    orientation = record_orientation(record)
    return tuple(Lesion(*orientation.map_point(lesion.x, lesion.y, shape), lesion.r)
                 for lesion in record.lesions)


# ----------------------------------------------------------------------------- MIAS

def _parse_mias_info(path: Path) -> dict[str, dict[str, Any]]:
    """Info.txt: one row per abnormality; y has its origin at the bottom-left (row = 1024 - y)."""
    cases: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("mdb"):
            continue
        case = cases.setdefault(parts[0], {"label": 0, "malignant": 0, "lesions": [],
                                           "density": parts[1], "findings": []})
        if parts[2] != "NORM":
            case["label"] = 1
            if parts[2] not in case["findings"]:
                case["findings"].append(parts[2])
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
    comes from the pixels (`chest_wall_on_right_from_pixels`); laterality from the reference number (odd =
    right breast: on 319 of the 322 films the chest wall is then on the right, the display
    convention the worker assumes for a right breast; the pairing, not the pixels, is the truth)."""
    mias_dir = Path(mias_dir).resolve()
    cases = _parse_mias_info(mias_dir / "Info.txt")
    records = []
    for ref in sorted(cases):
        case = cases[ref]
        image = mias_dir / f"{ref}.png"
        probe = Record(ref, image, "", "L", "MLO", 0, 0, "left")
        right = chest_wall_on_right_from_pixels(load_pixels(probe))
        number = int(ref[3:])
        records.append(Record(
            id=ref, image=image, group=f"mias-{(number + 1) // 2:03d}",
            laterality="R" if number % 2 == 1 else "L", view="MLO", label=case["label"],
            malignant=case["malignant"], chest_wall="right" if right else "left",
            lesions=tuple(case["lesions"]), mask=None, pixel_spacing_mm=MIAS_SPACING_MM,
            density=case["density"], findings=tuple(case["findings"]),
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

"""tools/model/dataset.py: manifests, orientation, grouped folds and splits (MIAS parts skip without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.model.dataset import (
    Lesion,
    Record,
    grouped_folds,
    lesions_in_model_orientation,
    load_pixels,
    main,
    mias_records,
    read_manifest,
    split_70_15_15,
    to_model_orientation,
    write_manifest,
)

MIAS = Path(__file__).resolve().parents[3] / "shared" / "data" / "mias"


def synthetic_records(tmp_path: Path, women: int = 40, seed: int = 1) -> list[Record]:
    """Two images per woman; about a fifth malignant, a fifth benign, the rest normal."""
    rng = np.random.default_rng(seed)
    records = []
    for woman in range(women):
        kind = rng.choice(["malignant", "benign", "normal"], p=[0.2, 0.2, 0.6])
        for side in ("L", "R"):
            abnormal = kind != "normal" and side == "L"
            records.append(Record(
                id=f"w{woman:03d}{side}", image=tmp_path / f"w{woman:03d}{side}.png",
                group=f"woman-{woman}", laterality=side, view="MLO", label=int(abnormal),
                malignant=int(abnormal and kind == "malignant"),
                chest_wall="right" if side == "R" else "left",
                lesions=(Lesion(10.0, 20.0, 5.0),) if abnormal else (),
                pixel_spacing_mm=0.2,
            ))
    return records


def test_manifest_round_trip_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    records = synthetic_records(tmp_path, women=3)
    outside = Record(id="x", image=Path("/elsewhere/x.png"), group="g", laterality="L", view="CC",
                     label=0, malignant=None, chest_wall="left", flip_rows=True,
                     mask=tmp_path / "masks" / "x.png")
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, [*records, outside])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["image"] == "w000L.png"  # inside the manifest's folder: relative
    assert lines[-1]["image"] == "/elsewhere/x.png"
    assert lines[-1]["mask"] == "masks/x.png" and lines[-1]["malignant"] is None
    assert read_manifest(path) == [*records, outside]


def test_manifest_rejects_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "image": "a.png", "group": "g", "laterality": "X",
                                "view": "MLO", "label": 0, "malignant": 0,
                                "chest_wall": "left"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_manifest(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_manifest(path)


def test_pixels_8_and_16_bit_and_orientation(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    Image.fromarray(array).save(tmp_path / "a16.png")
    Image.fromarray((array // 1000).astype(np.uint8)).save(tmp_path / "a8.png")
    record = Record(id="a", image=tmp_path / "a16.png", group="g", laterality="R", view="MLO",
                    label=1, malignant=0, chest_wall="right",
                    lesions=(Lesion(x=0.0, y=1.0, r=2.0),))
    pixels = load_pixels(record)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 4) and pixels.max() == 11000
    eight = load_pixels(Record(**{**record.__dict__, "image": tmp_path / "a8.png"}))
    assert eight.max() == 11
    oriented = to_model_orientation(pixels, record)
    assert oriented[0, 0] == pixels[0, 3]  # mirrored: chest wall now on the left
    assert lesions_in_model_orientation(record, pixels.shape) == (Lesion(3.0, 1.0, 2.0),)
    upside = Record(**{**record.__dict__, "chest_wall": "left", "flip_rows": True})
    assert to_model_orientation(pixels, upside)[0, 0] == pixels[2, 0]
    assert lesions_in_model_orientation(upside, pixels.shape) == (Lesion(0.0, 1.0, 2.0),)
    left = Record(**{**record.__dict__, "chest_wall": "left"})
    np.testing.assert_array_equal(to_model_orientation(pixels, left), pixels)


def _strata(records: list[Record], indices: list[int]) -> tuple[int, int, int]:
    groups = {records[i].group for i in indices}
    worst = {g: 0 for g in groups}
    for i in indices:
        r = records[i]
        worst[r.group] = max(worst[r.group], 2 if r.malignant else r.label)
    values = list(worst.values())
    return values.count(2), values.count(1), values.count(0)


def test_grouped_folds_keep_women_together_and_stratify(tmp_path: Path) -> None:
    records = synthetic_records(tmp_path, women=50)
    folds = grouped_folds(records, k=5, seed=3)
    assert sorted(i for fold in folds for i in fold) == list(range(len(records)))
    groups = [{records[i].group for i in fold} for fold in folds]
    for a in range(5):
        for b in range(a + 1, 5):
            assert not groups[a] & groups[b]
    total = _strata(records, list(range(len(records))))
    for fold in folds:
        for level, count in enumerate(_strata(records, fold)):
            assert abs(count - total[level] / 5) <= 1
    assert grouped_folds(records, k=5, seed=3) == folds  # seeded
    assert grouped_folds(records, k=5, seed=4) != folds


def test_split_70_15_15_grouped_and_stratified(tmp_path: Path) -> None:
    records = synthetic_records(tmp_path, women=60)
    train, val, test = split_70_15_15(records, seed=0)
    assert sorted(train + val + test) == list(range(len(records)))
    sets = [{records[i].group for i in part} for part in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert abs(len(sets[0]) - 42) <= 2 and abs(len(sets[1]) - 9) <= 2
    for part in (train, val, test):
        assert any(records[i].label for i in part)
    assert split_70_15_15(records, seed=0) == (train, val, test)


@pytest.mark.skipif(not (MIAS / "Info.txt").is_file(), reason="mini-MIAS not available")
def test_mias_adapter_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "mias.jsonl"
    assert main(["mias", str(MIAS), "--out", str(out)]) == 0
    records = read_manifest(out)
    assert records == mias_records(MIAS)
    assert len(records) == 322 and len({r.group for r in records}) == 161
    assert sum(r.label for r in records) == 115 and sum(r.malignant == 1 for r in records) == 52
    by_id = {r.id: r for r in records}
    assert by_id["mdb001"].group == by_id["mdb002"].group == "mias-001"
    assert {by_id["mdb001"].laterality, by_id["mdb002"].laterality} == {"L", "R"}
    # Info.txt: mdb001 G CIRC B 535 425 197 -> row 1024 - 425
    assert by_id["mdb001"].lesions == (Lesion(535.0, 599.0, 197.0),)
    agree = sum((r.chest_wall == "right") == (r.laterality == "R") for r in records)
    assert agree >= 315
    assert sum(1 for r in records if r.label and not r.lesions) >= 4  # rows without a centre
    pixels = load_pixels(by_id["mdb001"])
    assert pixels.shape == (1024, 1024)
    oriented = to_model_orientation(pixels, by_id["mdb001"])
    half = oriented[256:768]
    assert half[:, :512].mean() > half[:, 512:].mean()  # chest wall (more tissue) on the left

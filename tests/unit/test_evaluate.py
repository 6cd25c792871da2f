"""tools/model/evaluate.py on a tiny synthetic manifest scored by the shipped bundle.

The report must say what tools.model.metrics says about scores computed independently of the tool
(runner.predict on the oriented pixels), with one table row per image and per breast.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.calibration import Calibration
from pipelines.model import ModelRunner, load_bundle
from tools.model import evaluate, metrics
from tools.model.dataset import (
    Lesion,
    Record,
    load_pixels,
    read_manifest,
    to_model_orientation,
    write_manifest,
)
from tools.stack.make_study import render_breast

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"
ROWS, COLS = 288, 224
WOMEN = 4


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return load_bundle(BUNDLE, "cpu")


def _image(laterality: str, blob: tuple[float, float, float] | None, seed: int) -> np.ndarray:
    """A breast (chest wall on the DICOM side for its laterality), optionally a bright blob."""
    image = render_breast(ROWS, COLS, f"{laterality}-MLO", np.random.default_rng(seed), lesion=False)
    image = image.astype(np.float32)
    if blob is not None:
        x, y, r = blob
        yy, xx = np.mgrid[0:ROWS, 0:COLS]
        image += 1800.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (r / 2) ** 2))
    return np.clip(image, 0, 4095)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four women, both breasts each; 8-bit and 16-bit PNGs; a blob in three of the eight."""
    folder = tmp_path_factory.mktemp("data")
    records = []
    for woman in range(WOMEN):
        for laterality in ("L", "R"):
            index = len(records)
            has_blob = index in (1, 4, 7)
            x = 0.35 * COLS if laterality == "L" else 0.65 * COLS
            blob = (x, 0.55 * ROWS, 14.0) if has_blob else None
            pixels = _image(laterality, blob, seed=index)
            if index % 2:
                stored = (pixels * 65535 / 4095).astype(np.uint16)
            else:
                stored = (pixels * 255 / 4095).astype(np.uint8)
            name = f"img{index}.png"
            Image.fromarray(stored).save(folder / name)
            records.append(Record(
                id=f"img{index}", image=folder / name, group=f"woman{woman}",
                laterality=laterality, view="MLO", label=int(has_blob),
                malignant=int(index == 4), chest_wall="left" if laterality == "L" else "right",
                lesions=(Lesion(*blob),) if blob else (),
            ))
    path = folder / "manifest.jsonl"
    write_manifest(path, records)
    return path


@pytest.fixture(scope="module")
def report(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    assert evaluate.main(["--bundle", str(BUNDLE), "--manifest", str(manifest),
                          "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_files_are_written(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    points = json.loads((BUNDLE / "metadata.json").read_text())["operating_points"]
    expected = ["report.md", "report.html", "metrics.json", "images.csv", "breasts.csv", "roc.png",
                "calibration.png", *[f"confusion_{name}.png" for name in points],
                *[f"gallery_{c}.png" for c in ("tp", "fp", "fn", "tn")]]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "normal vs abnormal AUC" in markdown and "![ROC](roc.png)" in markdown
    assert "## Subgroups" in markdown and "By severity, abnormal images:" in markdown
    assert "<table>" in (out / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_equal_tools_metrics_on_independently_computed_scores(
    manifest: Path, report: tuple[Path, dict[str, Any]], runner: ModelRunner
) -> None:
    _, result = report
    m = result["metrics"]
    records = read_manifest(manifest)
    # Each woman's two MLO films in one call, each read against the other, as a study's views
    # are (the bundle's contralateral reading).
    scores = np.empty(len(records))
    for woman in sorted({r.group for r in records}):
        index = [i for i, r in enumerate(records) if r.group == woman]
        assert [records[i].laterality for i in index] == ["L", "R"]
        predictions = runner.predict(
            [to_model_orientation(load_pixels(records[i]), records[i]) for i in index],
            ["MLO", "MLO"], pixel_spacings=[None, None], contralateral=[1, 0])
        scores[index] = [prediction.probability for prediction in predictions]
    labels = np.array([r.label for r in records])
    groups = np.array([r.group for r in records])
    assert m["images"] == len(records) and m["women"] == WOMEN
    assert m["normal_vs_abnormal"]["auc"] == pytest.approx(metrics.auc(labels, scores), abs=1e-9)
    ci = metrics.bootstrap_auc_ci(labels, scores, groups, n=evaluate.BOOTSTRAP_ROUNDS, seed=0)
    assert m["normal_vs_abnormal"]["ci95"] == pytest.approx(list(ci), abs=1e-9)
    malignant = np.array([r.malignant for r in records])
    assert m["malignant_vs_rest"]["auc"] == pytest.approx(metrics.auc(malignant, scores), abs=1e-9)
    for name, threshold in result["bundle"]["operating_points"].items():
        expected = metrics.threshold_metrics(labels, scores, threshold)
        got = m["operating_points"][name]
        for key in ("tp", "fp", "tn", "fn"):
            assert got[key] == expected[key], (name, key)
        for key in ("accuracy", "sensitivity", "specificity"):
            assert got[key] == pytest.approx(expected[key], abs=1e-12), (name, key)
    bins = metrics.calibration_bins(labels, scores, bins=10)
    assert [b["count"] for b in m["calibration"]] == [b["count"] for b in bins]
    # Breast level: every breast here has one view, so breast scores are the image scores.
    assert m["breasts"]["count"] == len(records)
    assert m["breasts"]["normal_vs_abnormal"]["auc"] == pytest.approx(metrics.auc(labels, scores))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tables_have_one_row_per_image_and_per_breast(
    manifest: Path, report: tuple[Path, dict[str, Any]]
) -> None:
    out, result = report
    records = read_manifest(manifest)
    images = _rows(out / "images.csv")
    assert [row["id"] for row in images] == [r.id for r in records]
    breasts = _rows(out / "breasts.csv")
    assert sorted(row["breast"] for row in breasts) == sorted(
        {f"{r.group}-{r.laterality}" for r in records})
    by_id = {row["id"]: row for row in images}
    for breast in breasts:
        members = breast["images"].split()
        assert float(breast["score"]) == pytest.approx(max(float(by_id[i]["score"]) for i in members))
    hits = [row for row in images if row["hit"] != ""]
    assert len(hits) == sum(1 for r in records if r.lesions)
    loc = result["metrics"]["localisation"]
    assert loc["images_judged"] == len(hits)
    assert loc["hits"] == sum(int(row["hit"]) for row in hits)


def test_breast_rows_take_the_max_over_views() -> None:
    def outcome(id_: str, laterality: str, view: str, label: int, score: float) -> evaluate.Outcome:
        record = Record(id_, Path(f"{id_}.png"), "w1", laterality, view, label, None,
                        "left" if laterality == "L" else "right")
        return evaluate.Outcome(record, score)

    breasts = evaluate.breasts_of([outcome("a", "L", "CC", 0, 0.2), outcome("b", "L", "MLO", 1, 0.7),
                                   outcome("c", "R", "CC", 0, 0.4)])
    by_key = {b.key: b for b in breasts}
    assert set(by_key) == {"w1-L", "w1-R"}
    assert by_key["w1-L"].score == 0.7 and by_key["w1-L"].label == 1 and by_key["w1-L"].ids == ("a", "b")
    assert by_key["w1-R"].score == 0.4 and by_key["w1-R"].malignant is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_precomputed_predictions_are_reported_as_given(manifest: Path, tmp_path: Path) -> None:
    """tools/model/train.py's predictions.jsonl: a null score (a validation image) is left out, a
    given hit is taken as is, otherwise the hit is judged from the given peak."""
    records = read_manifest(manifest)
    scores = np.random.default_rng(3).uniform(0, 1, len(records))
    lines = []
    for index, (record, score) in enumerate(zip(records, scores, strict=True)):
        entry: dict[str, Any] = {"id": record.id, "group": record.group, "label": record.label,
                                 "fold": index % 2, "score": float(score), "hit": None,
                                 "peak_xy": None}
        if record.id == "img0":
            entry["score"], entry["fold"] = None, -2
        if record.id == "img1":  # peak on the lesion, hit left to the tool
            entry["peak_xy"] = [record.lesions[0].x, record.lesions[0].y]
        if record.id == "img4":  # hit given by the training run
            entry["hit"], entry["peak_xy"] = True, [record.lesions[0].x + 3, record.lesions[0].y]
        if record.id == "img7":  # peak far from the lesion
            entry["heatmap_peak"] = [0.0, 0.0]
        lines.append(json.dumps(entry))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    assert evaluate.main(["--bundle", str(BUNDLE), "--manifest", str(manifest),
                          "--predictions", str(predictions), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    kept = [i for i, r in enumerate(records) if r.id != "img0"]
    labels = [records[i].label for i in kept]
    assert m["images"] == len(kept)
    assert m["normal_vs_abnormal"]["auc"] == pytest.approx(metrics.auc(labels, scores[kept]))
    assert (m["localisation"]["hits"], m["localisation"]["images_judged"]) == (2, 3)
    images = _rows(out / "images.csv")
    assert [row["id"] for row in images] == [records[i].id for i in kept]
    # The given scores are raw model outputs: put on the bundle's calibrated scale, the scale of
    # its operating points (same ranking, so the AUC above is the raw one), with the raw
    # reliability curve beside the calibrated one.
    calibration = Calibration.from_metadata(json.loads((BUNDLE / "metadata.json").read_text()))
    assert calibration is not None
    assert [float(row["score"]) for row in images] == pytest.approx(
        calibration.scores(scores[kept]).tolist(), abs=1e-6)
    assert [b["count"] for b in m["calibration_raw"]] == [
        b["count"] for b in metrics.calibration_bins(labels, scores[kept])]
    assert "dotted curve" in (out / "report.md").read_text()

    fold_out = tmp_path / "fold1"
    assert evaluate.main(["--bundle", str(BUNDLE), "--manifest", str(manifest), "--predictions",
                          str(predictions), "--fold", "1", "--out", str(fold_out)]) == 0
    assert [row["id"] for row in _rows(fold_out / "images.csv")] == [
        r.id for i, r in enumerate(records) if i % 2 == 1]

    predictions.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="without a prediction"):
        evaluate.main(["--bundle", str(BUNDLE), "--manifest", str(manifest),
                       "--predictions", str(predictions), "--out", str(tmp_path / "r2")])


def test_fold_and_split_selection_are_grouped(manifest: Path) -> None:
    records = read_manifest(manifest)
    seen: list[str] = []
    for fold in range(2):
        chosen, description = evaluate.select_records(records, fold, 2, None, seed=0)
        assert "fold" in description
        groups = {r.group for r in chosen}
        assert all(r.group in groups for r in records if r.group in groups)
        seen += [r.id for r in chosen]
    assert sorted(seen) == sorted(r.id for r in records)
    with pytest.raises(ValueError):
        evaluate.select_records(records, 5, 2, None, seed=0)


def test_counterparts_pair_the_same_view_of_a_womans_other_breast() -> None:
    """The pairing the worker makes inside a study: same woman, same view, other side; a film
    with no such film in the manifest has none (it is read as a one-breast study is)."""
    def record(id_: str, group: str, laterality: str, view: str) -> Record:
        return Record(id_, Path(f"{id_}.png"), group, laterality, view, 0, None,
                      "right" if laterality == "R" else "left")

    films = [record("a", "w1", "R", "MLO"), record("b", "w1", "L", "MLO"),
             record("c", "w1", "L", "CC"), record("d", "w2", "R", "MLO"),
             record("e", "w3", "L", "MLO"), record("f", "w3", "R", "MLO")]
    pairs = {key: value.id for key, value in evaluate.counterparts(films).items()}
    assert pairs == {"a": "b", "b": "a", "e": "f", "f": "e"}

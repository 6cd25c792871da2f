"""Metrics within subgroups (breast density, finding class, severity): tools/model/evaluate.py's
`subgroup_metrics`, the bundle's `metrics.subgroups` (tools/model/export.py) and its card.

The numbers are counted by hand on made-up outcomes; the shipped bundle's table must be what its
own out-of-fold predictions give (skipped without mini-MIAS)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tools.model import evaluate, metrics
from tools.model.dataset import Lesion, Record, mias_records, read_manifest, write_manifest
from tools.model.export import SUBGROUPS_KEY, model_card, subgroups_of_predictions

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "mias-baseline"
MIAS = ROOT.parent / "shared" / "data" / "mias"
POINTS = {"balanced": 0.5, "high_sensitivity": 0.2}


def _record(index: int, density: str, label: int, malignant: int = 0,
            findings: tuple[str, ...] = ()) -> Record:
    return Record(id=f"img{index:02d}", image=Path(f"/data/img{index:02d}.png"),
                  group=f"woman{index // 2}", laterality="LR"[index % 2], view="MLO",
                  label=label, malignant=malignant, chest_wall="left",
                  lesions=(Lesion(10.0, 10.0, 5.0),) if label else (), density=density,
                  findings=findings)


def _outcomes() -> list[evaluate.Outcome]:
    """Fatty: 4 normal (scores 0.1, 0.3, 0.6, 0.15) and 2 abnormal (0.9 CIRC benign, hit; 0.4
    CALC malignant, missed). Dense: 3 normal (0.7, 0.55, 0.1), 3 abnormal (0.8 CIRC+CALC
    malignant, hit; 0.25 SPIC benign, no hit judged; 0.6 SPIC malignant, hit)."""
    rows = [("F", 0, 0, (), 0.1, None), ("F", 0, 0, (), 0.3, None), ("F", 0, 0, (), 0.6, None),
            ("F", 0, 0, (), 0.15, None), ("F", 1, 0, ("CIRC",), 0.9, True),
            ("F", 1, 1, ("CALC",), 0.4, False),
            ("D", 0, 0, (), 0.7, None), ("D", 0, 0, (), 0.55, None), ("D", 0, 0, (), 0.1, None),
            ("D", 1, 1, ("CIRC", "CALC"), 0.8, True), ("D", 1, 0, ("SPIC",), 0.25, None),
            ("D", 1, 1, ("SPIC",), 0.6, True)]
    outcomes = []
    for index, (density, label, malignant, findings, score, hit) in enumerate(rows):
        outcome = evaluate.Outcome(_record(index, density, label, malignant, findings), score)
        outcome.hit = hit
        outcomes.append(outcome)
    return outcomes


def test_density_rows_count_specificity_sensitivity_and_auc_by_hand() -> None:
    groups = evaluate.subgroup_metrics(_outcomes(), POINTS, seed=3)
    fatty, dense = groups["density"]  # in the known order: F before G before D
    assert (fatty["code"], fatty["name"], dense["code"], dense["name"]) == (
        "F", "fatty", "D", "dense-glandular")
    assert (fatty["images"], fatty["normal"], fatty["abnormal"], fatty["women"]) == (6, 4, 2, 3)
    # fatty normals below 0.5: 0.1, 0.3, 0.15 -> 3 of 4; below 0.2: 0.1, 0.15 -> 2 of 4
    assert (fatty["specificity"]["balanced"]["count"], fatty["specificity"]["balanced"]["of"]) == (3, 4)
    assert fatty["specificity"]["high_sensitivity"]["count"] == 2
    # fatty abnormal at or above 0.5: 0.9 -> 1 of 2; dense: 0.8, 0.6 -> 2 of 3
    assert fatty["sensitivity"]["balanced"]["rate"] == pytest.approx(0.5)
    assert dense["sensitivity"]["balanced"]["rate"] == pytest.approx(2 / 3)
    assert dense["specificity"]["balanced"]["rate"] == pytest.approx(1 / 3)  # only 0.1 below
    # fatty AUC: 0.9 beats all 4 normals, 0.4 beats 3 -> 7/8
    assert fatty["normal_vs_abnormal"]["auc"] == pytest.approx(7 / 8)
    dense_outcomes = _outcomes()[6:]
    assert dense["normal_vs_abnormal"]["auc"] == pytest.approx(metrics.auc(
        [o.record.label for o in dense_outcomes], [o.score for o in dense_outcomes]))
    for row in groups["density"]:
        for block in (*row["specificity"].values(), *row["sensitivity"].values()):
            low, high = block["ci95"]
            assert 0.0 <= low <= block["rate"] <= high <= 1.0


def test_finding_and_severity_rows_count_each_class_and_the_hits() -> None:
    groups = evaluate.subgroup_metrics(_outcomes(), POINTS, seed=3)
    by_code = {row["code"]: row for row in groups["finding"]}
    assert list(by_code) == ["CALC", "CIRC", "SPIC"]  # the dataset's order of known classes
    # the CIRC + CALC image counts in both classes
    assert (by_code["CALC"]["images"], by_code["CIRC"]["images"], by_code["SPIC"]["images"]) == (
        2, 2, 2)
    assert by_code["CALC"]["sensitivity"]["balanced"]["count"] == 1  # 0.8 yes, 0.4 no
    assert (by_code["CALC"]["hits"], by_code["CALC"]["images_judged"]) == (1, 2)
    assert (by_code["SPIC"]["hits"], by_code["SPIC"]["images_judged"]) == (1, 1)  # one not judged
    assert by_code["CIRC"]["malignant"] == 1
    benign, malignant = groups["severity"]
    assert (benign["code"], benign["images"], malignant["code"], malignant["images"]) == (
        "benign", 2, "malignant", 3)
    assert benign["sensitivity"]["balanced"]["count"] == 1  # 0.9
    assert malignant["sensitivity"]["balanced"]["count"] == 2  # 0.8, 0.6; not 0.4
    assert malignant["sensitivity"]["high_sensitivity"]["count"] == 3


def test_the_exam_verdict_is_the_highest_score_of_each_womans_images() -> None:
    exams = evaluate.exam_metrics(_outcomes(), POINTS, seed=3)
    # women (pairs of images): normal 0.3, 0.6, 0.7; abnormal 0.9, 0.8, 0.6
    assert (exams["women"], exams["normal"], exams["abnormal"], exams["images_per_woman"]) == (
        6, 3, 3, 2.0)
    assert (exams["specificity"]["balanced"]["count"], exams["specificity"]["balanced"]["of"]) == (
        1, 3)
    assert exams["specificity"]["high_sensitivity"]["count"] == 0
    assert exams["sensitivity"]["balanced"]["count"] == 3
    assert exams["normal_vs_abnormal"]["auc"] == pytest.approx(7.5 / 9)  # one tie at 0.6
    lines = evaluate.subgroup_markdown({"exams": exams}, ["balanced"])
    assert any(line.startswith("| exam (woman) | 0.833 (") and "| 0.333 (1/3;" in line
               for line in lines)


def test_data_without_density_or_classes_gives_empty_tables() -> None:
    outcomes = [evaluate.Outcome(_record(i, "F", i % 2), 0.1 * i) for i in range(6)]
    for outcome in outcomes:
        outcome.record = replace(outcome.record, density=None)
    groups = evaluate.subgroup_metrics(outcomes, POINTS)
    assert groups["density"] == [] and groups["finding"] == []
    assert [row["images"] for row in groups["severity"]] == [3]  # abnormal, all benign
    assert evaluate.subgroup_markdown({"density": [], "finding": [], "severity": []},
                                      ["balanced"]) == []


def test_bootstrap_rate_ci_resamples_women() -> None:
    # one woman with two negatives, four women with one positive each: rate 4/6
    outcomes = np.array([0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "a", "b", "c", "d", "e"])
    low, high = metrics.bootstrap_rate_ci(outcomes, groups, n=500, seed=1)
    assert 0.0 <= low < 4 / 6 < high == 1.0  # a resample without woman "a" is all positive
    assert np.isnan(metrics.bootstrap_rate_ci([], [], n=10)[0])


def test_density_and_findings_survive_the_manifest(tmp_path: Path) -> None:
    records = [_record(0, "D", 1, 1, ("CALC", "CIRC")), _record(1, "F", 0)]
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, records)
    assert read_manifest(path) == records
    plain = Record(id="x", image=tmp_path / "x.png", group="g", laterality="L", view="CC",
                   label=0, malignant=None, chest_wall="left")
    write_manifest(path, [plain])
    assert "density" not in json.loads(path.read_text())  # absent stays absent
    assert read_manifest(path) == [plain]


def _bundle_metadata() -> dict:
    return json.loads((BUNDLE / "metadata.json").read_text())


def test_the_card_shows_the_subgroups_at_the_balanced_point() -> None:
    metadata = _bundle_metadata()
    groups = evaluate.subgroup_metrics(_outcomes(), POINTS, seed=3)
    metadata["metrics"][SUBGROUPS_KEY] = {"scores": "made-up outcomes", **groups}
    card = model_card(metadata, "")
    assert "### Per exam and within subgroups" in card and "Scores: made-up outcomes" in card
    assert "| fatty (F) | 6 (4 / 2) | 0.875" in card
    assert "| calcification (CALC) | 2 (2) | 0.500 (1/2;" in card
    assert "sensitivity at high_sensitivity" not in card  # the reported point only
    del metadata["metrics"][SUBGROUPS_KEY]
    assert "within subgroups" not in model_card(metadata, "")


@pytest.mark.skipif(not MIAS.is_dir(), reason="../shared/data/mias not present")
@pytest.mark.timeout(300)
def test_the_shipped_bundles_subgroups_are_its_own_out_of_fold_predictions() -> None:
    """The card's table is what the shipped predictions.jsonl gives, recomputed here."""
    metadata = _bundle_metadata()
    shipped = metadata["metrics"][SUBGROUPS_KEY]
    again = subgroups_of_predictions(metadata, BUNDLE / "predictions.jsonl",
                                     mias_records(MIAS))
    assert again == shipped
    assert sum(row["images"] for row in shipped["density"]) == 322
    assert sum(row["images"] for row in shipped["severity"]) == 115
    judged = sum(row["images_judged"] for row in shipped["severity"])
    hits = sum(row["hits"] for row in shipped["severity"])
    assert (hits, judged) == tuple(metadata["metrics"]["lesion_hits"])
    point = metadata["metrics"]["at_operating_points"]["balanced"]
    assert sum(row["specificity"]["balanced"]["count"] for row in shipped["density"]) == point["tn"]
    assert sum(row["sensitivity"]["balanced"]["count"] for row in shipped["density"]) == point["tp"]
    assert shipped["exams"]["women"] == metadata["training"]["groups"]
    assert (BUNDLE / "README.md").read_text().count("### Per exam and within subgroups") == 1

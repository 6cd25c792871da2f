"""Score drift (node/drift.py, node/drift_report.py): the statistics on known distributions, the
bins, the rolling store across restarts, serve's gauges, and `mammo-node drift`'s report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from node.cli import main
from node.drift import (
    REFERENCE_BINS,
    DriftCollector,
    DriftStore,
    ExamEntry,
    Reference,
    SourceKey,
    bin_fractions,
    compare,
    ks_statistic,
    psi,
    reference_for_store,
    reference_from_scores,
    verdict,
)
from pipelines.calibration import Calibration
from tests.support.settings import write_config
from tools.model.export import reference_of_predictions

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "mias-baseline"
KEY = SourceKey("m", "1", "MG_ONE", "Vendor A")


def _scores(seed: int, n: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.beta(6, 3, n) + shift, 0.0, 1.0)


def _reference(seed: int = 0, n: int = 2000) -> Reference:
    reference = Reference.from_json(reference_from_scores(_scores(seed, n), "test"))
    assert reference is not None
    return reference


def test_psi_and_ks_are_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    reference = _reference()
    same = _scores(1, 2000)
    shifted = _scores(2, 2000, shift=0.15)
    same_psi = psi(reference.fractions, bin_fractions(same, reference.edges))
    shifted_psi = psi(reference.fractions, bin_fractions(shifted, reference.edges))
    assert same_psi < 0.02
    assert shifted_psi > 0.25
    assert ks_statistic(reference.scores, same) < 0.05
    assert ks_statistic(reference.scores, shifted) > 0.3
    assert psi([0.25, 0.25, 0.5], [0.25, 0.25, 0.5]) == 0.0
    assert ks_statistic([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0.0
    assert ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1.0
    # An empty bin is floored, not infinite.
    assert np.isfinite(psi([0.5, 0.5], [1.0, 0.0]))


def test_reference_bins_are_the_deciles_of_the_reference() -> None:
    data = reference_from_scores(_scores(0, 1000), "test")
    edges = data["bins"]
    assert edges[0] == 0.0 and edges[-1] == 1.0 and len(edges) == REFERENCE_BINS + 1
    assert all(b > a for a, b in zip(edges, edges[1:], strict=False))
    assert data["fractions"] == pytest.approx([0.1] * REFERENCE_BINS, abs=0.002)
    assert data["n"] == 1000 and data["scores"] == sorted(data["scores"])
    # Ties collapse bins rather than making empty or reversed ones.
    tied = reference_from_scores([0.5] * 50 + list(np.linspace(0.6, 0.9, 50)), "ties")
    assert all(b > a for a, b in zip(tied["bins"], tied["bins"][1:], strict=False))
    assert sum(tied["fractions"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        reference_from_scores([0.5, 0.6], "too few")
    assert Reference.from_json({"bins": [0, 1], "fractions": []}) is None
    assert Reference.from_json({"bins": [0.5, 0.2], "fractions": [1], "scores": [0.3],
                                "n": 1}) is None
    assert Reference.from_json(None) is None


def test_the_shipped_bundle_carries_the_reference_of_its_out_of_fold_predictions() -> None:
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    # On the scale the worker reports: calibrated when the bundle is (pipelines/calibration.py).
    assert metadata["reference_scores"] == reference_of_predictions(
        BUNDLE / "predictions.jsonl", Calibration.from_metadata(metadata))
    assert metadata["reference_scores"]["n"] == metadata["training"]["images"]
    assert Reference.from_json(metadata["reference_scores"]) is not None


def test_verdicts_follow_the_usual_psi_reading() -> None:
    assert verdict(0.05, 100) == "stable"
    assert verdict(0.1, 100) == "moderate shift"
    assert verdict(0.3, 100) == "significant shift"
    assert verdict(0.3, 10, min_exams=50) == "too few exams"


def _exam(index: int, images: tuple[float, ...]) -> ExamEntry:
    return ExamEntry(at=1_700_000_000.0 + index, run_id=f"run-{index}", exam=max(images),
                     images=images)


def test_the_store_keeps_the_last_window_per_source_across_restarts(tmp_path: Path) -> None:
    store = DriftStore(tmp_path, window=10, max_sources=64)
    other = SourceKey("m", "1", "MG_TWO", "Vendor B")
    for index in range(35):
        store.record(KEY, _exam(index, (0.1, 0.2, 0.3, 0.4)))
    store.record(other, _exam(100, (0.9, 0.8)))
    store.record(KEY, _exam(34, (0.1, 0.2, 0.3, 0.4)))  # the same run again: counted once

    restarted = DriftStore(tmp_path, window=10)
    windows = dict(restarted.windows())
    assert [e.run_id for e in windows[KEY]] == [f"run-{i}" for i in range(25, 35)]
    assert windows[other][0].images == (0.9, 0.8)
    # Trimmed on disk too: at most twice the window, file names are hashes, not AE titles.
    for path in (tmp_path / "drift" / "sources").iterdir():
        assert len(path.read_text().splitlines()) <= 20
        assert "MG_" not in path.name and "Vendor" not in path.name
    # A torn last line (a crash mid-append) is skipped.
    path = tmp_path / "drift" / "sources" / f"{KEY.file_stem}.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"at": 1, "run_id": "torn", "exa')
    assert [e.run_id for e in dict(restarted.windows())[KEY]][-1] == "run-34"


def test_the_store_caps_sources_and_keeps_references(tmp_path: Path) -> None:
    store = DriftStore(tmp_path, window=10, max_sources=2)
    reference = reference_from_scores(_scores(0, 200), "test")
    filed = [store.record(SourceKey("m", "1", "AE", f"Vendor {i}"), _exam(i, (0.5,)), reference)
             for i in range(4)]
    assert [k.manufacturer for k in filed] == ["Vendor 0", "Vendor 1", "other", "other"]
    assert len(store.windows()) == 3
    read_back = store.reference("m", "1")
    assert read_back is not None and read_back.n == 200
    assert store.reference("m", "2") is None


def test_serve_exports_psi_ks_and_window_size_per_source(tmp_path: Path) -> None:
    store = DriftStore(tmp_path, window=200)
    reference = reference_from_scores(_scores(0, 2000), "test")
    rng = np.random.default_rng(3)
    for index in range(60):
        images = tuple(float(s) for s in np.clip(rng.beta(6, 3, 4) + 0.2, 0, 1))
        store.record(KEY, _exam(index, images), reference)
    store.record(SourceKey("unreferenced", "0", "AE", "V"), _exam(0, (0.5,)))
    registry = CollectorRegistry()
    registry.register(DriftCollector(store))
    text = generate_latest(registry).decode()
    labels = 'calling_ae="MG_ONE",manufacturer="Vendor A",model="m",model_version="1"'
    assert f"mammo_score_drift_exams{{{labels}}} 60.0" in text
    psi_value = registry.get_sample_value("mammo_score_drift_psi", {
        "model": "m", "model_version": "1", "calling_ae": "MG_ONE", "manufacturer": "Vendor A"})
    assert psi_value is not None and psi_value > 0.25
    assert 'mammo_score_drift_exams{calling_ae="AE",manufacturer="V",model="unreferenced"' in text
    assert 'mammo_score_drift_psi{calling_ae="AE"' not in text  # no reference, no PSI


def test_drift_report_table_plot_and_exit_code(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.yaml", drift={"window": 100, "min_exams": 20})
    spool = tmp_path / "spool"
    store = DriftStore(spool, window=100)
    reference = reference_from_scores(_scores(0, 2000), "test")
    steady, drifting = SourceKey("m", "1", "MG_STEADY", "V"), SourceKey("m", "1", "MG_DRIFT", "V")
    rng = np.random.default_rng(5)
    for index in range(80):
        store.record(steady, _exam(index, tuple(float(s) for s in rng.beta(6, 3, 4))), reference)
        store.record(drifting, _exam(1000 + index, tuple(
            float(s) for s in np.clip(rng.beta(6, 3, 4) - 0.25, 0, 1))), reference)
    out = tmp_path / "report"
    assert main(["drift", "--config", str(config), "--out", str(out)]) == 1  # a significant shift
    report = json.loads((out / "drift.json").read_text())
    rows = {row["calling_ae"]: row for row in report["sources"]}
    assert rows["MG_STEADY"]["verdict"] == "stable" and rows["MG_STEADY"]["exams"] == 80
    assert rows["MG_DRIFT"]["verdict"] == "significant shift"
    assert rows["MG_DRIFT"]["mean_exam_score"] < rows["MG_STEADY"]["mean_exam_score"]
    assert rows["MG_STEADY"]["images"] == 320
    expected = compare(store.reference("m", "1"), dict(store.windows())[drifting])  # type: ignore[arg-type]
    assert rows["MG_DRIFT"]["psi"] == expected.psi and rows["MG_DRIFT"]["ks"] == expected.ks
    table = (out / "report.md").read_text()
    assert "| m 1 | MG_DRIFT | V | 80 | 320 |" in table and "significant shift" in table
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_report_of_an_empty_store(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.yaml")
    (tmp_path / "spool").mkdir()
    out = tmp_path / "report"
    assert main(["drift", "--config", str(config), "--out", str(out)]) == 0
    assert json.loads((out / "drift.json").read_text())["sources"] == []
    assert (out / "drift.png").is_file()


def test_the_report_says_what_each_operating_point_flags_of_a_source(tmp_path: Path) -> None:
    """The store keeps the shipped bundle's points with the share of normal exams each flagged
    (the card's per-exam table); the report counts each source's exams at or above each point."""
    metadata = json.loads((ROOT / "models" / "mias-baseline" / "metadata.json").read_text())
    stored = reference_for_store(metadata)
    assert stored is not None
    points = metadata["operating_points"]
    config = write_config(tmp_path / "node.yaml", drift={"window": 100, "min_exams": 20})
    store = DriftStore(tmp_path / "spool", window=100)
    exams = [0.05 + 0.9 * i / 59 for i in range(60)]  # evenly spread exam scores
    for index, exam in enumerate(exams):
        store.record(KEY, _exam(index, (exam, exam / 2)), stored)
    reference = store.reference("m", "1")
    assert reference is not None and set(reference.points) == set(points)
    out = tmp_path / "report"
    main(["drift", "--config", str(config), "--out", str(out)])
    [row] = json.loads((out / "drift.json").read_text())["sources"]
    shares = {p["name"]: p for p in row["points"]}
    assert list(shares) == sorted(points, key=points.get)  # lowest threshold first
    for name, threshold in points.items():
        flagged = sum(exam >= threshold for exam in exams)
        specificity = metadata["operating_points_detail"][name]["exam_specificity"]
        assert shares[name]["exams_at_or_above"] == flagged
        assert shares[name]["share"] == pytest.approx(flagged / len(exams), abs=1e-6)
        assert shares[name]["normal_exam_flag_rate"] == pytest.approx(1 - specificity)
    table = (out / "report.md").read_text()
    flagged = shares["balanced"]["exams_at_or_above"]
    assert (f"| m 1 | MG_ONE | Vendor A | 60 | balanced | {points['balanced']:.3f} | {flagged} | "
            f"{flagged / 60:.3f} | {shares['balanced']['normal_exam_flag_rate']:.3f} |") in table
    # a reference stored before the points were kept, and a bundle without a reference
    bare = Reference.from_json(metadata["reference_scores"])
    assert bare is not None and not bare.points and not compare(bare, [_exam(0, (0.5,))]).points
    assert reference_for_store({"operating_points": points}) is None


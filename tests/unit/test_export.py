"""tools/model/export.py: a trained folder becomes a bundle the worker loads, with an honest card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from node.bundle import REQUIRED_KEYS
from pipelines.calibration import Calibration
from pipelines.model import load_bundle
from pipelines.preprocess import build_preprocess
from tests.support.synthetic_dataset import write_synthetic
from tools.model import metrics
from tools.model.export import export, load_trained, main
from tools.model.train import main as train_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = write_synthetic(tmp_path_factory.mktemp("synthetic"), women=12, size=80, seed=2)
    out = tmp_path_factory.mktemp("trained")
    assert train_main(["--manifest", str(manifest), "--out", str(out), "--arch", "unet",
                       "--cv", "2", "--epochs", "2", "--patch", "32", "--size", "48",
                       "--batch-size", "8", "--threads", "1", "--device", "cpu",
                       "--min-epochs", "1", "--val-every", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    notes = out.parent / "notes.md"
    notes.write_text("\n## Ideas tried\n| idea | AUC |\n|---|---|\n| tiny | 0.5 |\n")
    assert main([str(trained), "--out", str(out), "--name", "tiny-test", "--version", "9.9.9",
                 "--notes", str(notes), "--threads", "1"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bundle_passes_the_worker_checks_and_scores(bundle: Path) -> None:
    runner = load_bundle(bundle, "cpu")
    metadata = runner.metadata
    assert set(REQUIRED_KEYS) <= set(metadata)
    assert (metadata["name"], metadata["version"]) == ("tiny-test", "9.9.9")
    assert metadata["input"]["height"] == metadata["input"]["width"] == 48
    assert metadata["input"]["orientation"] == "chest_wall_left"
    assert metadata["output"]["heatmap_size"] == [48, 48]
    image = np.random.default_rng(0).random((300, 250)).astype(np.float32) * 4095
    [prediction] = runner.predict([image])
    assert 0.0 <= prediction.probability <= 1.0 and prediction.heatmap.shape == (300, 250)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metadata_carries_validation_operating_points_metrics_and_command(
        trained: Path, bundle: Path) -> None:
    metadata = json.loads((bundle / "metadata.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    points = metrics["evaluation"]["operating_points"]  # chosen on out-of-fold predictions
    raw_points = {k: v["threshold"] for k, v in points.items()}
    calibration = Calibration.from_metadata(metadata)
    if calibration is None:  # a tiny model may rank backwards: then it is left uncalibrated
        assert metadata["operating_points"] == raw_points
    else:  # the same images on the calibrated scale (Platt is strictly increasing)
        # the per-image points are train.py's; an exam point (per woman) may come beside them
        declared = metadata["calibration"]["raw_operating_points"]
        assert {k: declared[k] for k in raw_points} == pytest.approx(raw_points, abs=1e-6)
        for name, threshold in raw_points.items():
            assert metadata["operating_points"][name] == pytest.approx(
                calibration.score(threshold), abs=1e-5)
    assert metadata["format"] == "pt2" and (bundle / "model.pt2").is_file()
    assert not (bundle / "model.ts").exists()
    assert "domain" not in metadata  # synthetic training data: no domain to declare
    assert set(metadata["operating_points"]) - {"exam_specificity_90"} == {"balanced",
                                                                          "high_sensitivity"}
    m = metadata["metrics"]
    low, high = m["normal_vs_abnormal_auc_ci95"]
    assert low <= m["normal_vs_abnormal_auc"] <= high and len(m["fold_aucs"]) == 2
    assert "grouped by woman" in m["split"]
    t = metadata["training"]
    assert t["command"].startswith("python -m tools.model.train ") and "--cv 2" in t["command"]
    assert t["export_command"].startswith("python -m tools.model.export ")
    assert t["arch_config"]["arch"] == "unet" and t["inference"]["threads"] == 1
    assert t["inference"]["image_1024x832_ms"] > 0
    # The drift reference: the out-of-fold image scores with their decile bins (node/drift.py).
    reference = metadata["reference_scores"]
    oof = [json.loads(line)["score"] for line in (trained / "predictions.jsonl").read_text().splitlines()]
    if calibration is not None:
        oof = calibration.scores(oof).tolist()
    assert reference["n"] == len(oof) and reference["scores"] == sorted(round(s, 6) for s in oof)
    assert reference["bins"][0] == 0.0 and reference["bins"][-1] == 1.0
    assert sum(reference["fractions"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_model_card(bundle: Path) -> None:
    card = (bundle / "README.md").read_text()
    for text in ("Research use only, not for diagnosis", "Suckling", "200 µm", "MLO",
                 "python -m tools.model.train ", "python -m tools.model.export ", "## Ideas tried",
                 "95 % CI", "balanced", "high_sensitivity", "`model.pt2`", "torch.export",
                 "## Calibration", "## Domain"):
        assert text in card, text


def _inputs(bundle: Path) -> torch.Tensor:
    preprocess = build_preprocess({"input": json.loads((bundle / "metadata.json").read_text())
                                   ["input"]})
    return torch.stack([preprocess(np.random.default_rng(i).random((90, 70)).astype(np.float32))
                        for i in range(3)])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exported_program_matches_the_trained_network(trained: Path, bundle: Path) -> None:
    """export -> torch.export.load -> the worker's runner: the eager network's outputs, at a
    batch size other than the one exported with (the batch dimension is dynamic)."""
    model, config, _ = load_trained(trained)
    exported = torch.export.load(str(bundle / "model.pt2")).module()
    x = _inputs(bundle)
    runner = load_bundle(bundle, "cpu")
    with torch.inference_mode():
        eager = model(x)
        for n in (1, 3):
            for expected, got in zip((t[:n] for t in eager), exported(x[:n]), strict=True):
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        probability, heatmap = runner._forward(x)
    torch.testing.assert_close(probability, eager[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(heatmap, eager[1], atol=1e-6, rtol=0)
    image = np.random.default_rng(5).random((90, 70)).astype(np.float32)
    [prediction] = runner.predict([image])
    with torch.inference_mode():
        raw = float(model(runner.preprocess(image)[None])[0][0])
    expected = raw if runner.calibration is None else runner.calibration.score(raw)
    assert prediction.probability == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_older_torchscript_bundle_still_loads_with_a_warning(
        trained: Path, bundle: Path, tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from node.bundle import file_sha256

    model, _, _ = load_trained(trained)
    legacy = tmp_path / "legacy"
    shutil.copytree(bundle, legacy)
    (legacy / "model.pt2").unlink()
    x = _inputs(bundle)
    with torch.inference_mode():
        torch.jit.trace(model, x, check_trace=False).save(str(legacy / "model.ts"))
    metadata = json.loads((legacy / "metadata.json").read_text())
    metadata.pop("format")  # bundles exported before .pt2 had no format: TorchScript
    metadata["model_sha256"] = file_sha256(legacy / "model.ts")
    (legacy / "metadata.json").write_text(json.dumps(metadata))
    with capture_logs() as logs:
        runner = load_bundle(legacy, "cpu")
    assert [e["event"] for e in logs].count("model_format_deprecated") == 1
    with torch.inference_mode():
        expected = model(x)
    for got, want in zip(runner._forward(x), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_calibrate_adds_platt_scaling_to_an_exported_bundle(bundle: Path, tmp_path: Path) -> None:
    """`--calibrate` on an existing bundle: no retraining, the model file untouched, the
    operating points moved to the calibrated scale with the same images on each side."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    rng = np.random.default_rng(3)
    labels = (rng.random(60) < 0.4).astype(int)
    scores = np.clip(0.5 + 0.2 * labels + rng.normal(0, 0.15, 60), 0, 1).round(6)
    (target / "predictions.jsonl").write_text("".join(
        json.dumps({"id": f"i{i}", "group": f"w{i // 2}", "label": int(label),
                    "score": float(score)}) + "\n"
        for i, (label, score) in enumerate(zip(labels, scores, strict=True))))
    before = json.loads((target / "metadata.json").read_text())
    assert main([str(target), "--calibrate", "--version", "9.9.10"]) == 0
    metadata = json.loads((target / "metadata.json").read_text())
    assert metadata["model_sha256"] == before["model_sha256"] and metadata["version"] == "9.9.10"
    assert metadata["training"]["upgrade_commands"][-1].startswith(
        "python -m tools.model.export ")
    calibration = Calibration.from_metadata(metadata)
    assert calibration is not None
    # The method with the lower cross-fitted log loss over the women's folds, both recorded.
    compared = metadata["calibration"]["methods_compared"]
    assert set(compared) == {"platt", "platt-logit"}
    assert calibration.method == min(compared, key=lambda m: compared[m]["cross_fitted_log_loss"])
    calibrated = calibration.scores(scores)
    for name, point in metrics.operating_points(labels, scores).items():
        assert np.array_equal(scores >= point["threshold"],
                              calibrated >= metadata["operating_points"][name]), name
    assert "Platt scaling" in (target / "README.md").read_text()
    assert load_bundle(target, "cpu").calibration == calibration


def test_missing_weights_are_reported(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="model.pt missing"):
        export(tmp_path, tmp_path / "out", "x", "1", None, 1, [])

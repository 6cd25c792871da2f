"""tools/model/export.py: a trained folder becomes a bundle the worker loads, with an honest card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.model import REQUIRED_KEYS, load_bundle
from pipelines.preprocess import build_preprocess
from tests.support.synthetic_dataset import write_synthetic
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
    assert metadata["operating_points"] == {k: v["threshold"] for k, v in points.items()}
    assert set(metadata["operating_points"]) == {"balanced", "high_sensitivity"}
    m = metadata["metrics"]
    low, high = m["normal_vs_abnormal_auc_ci95"]
    assert low <= m["normal_vs_abnormal_auc"] <= high and len(m["fold_aucs"]) == 2
    assert "grouped by woman" in m["split"]
    t = metadata["training"]
    assert t["command"].startswith("python -m tools.model.train ") and "--cv 2" in t["command"]
    assert t["export_command"].startswith("python -m tools.model.export ")
    assert t["arch_config"]["arch"] == "unet" and t["inference"]["threads"] == 1
    assert t["inference"]["image_1024x832_ms"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_model_card(bundle: Path) -> None:
    card = (bundle / "README.md").read_text()
    for text in ("Research use only, not for diagnosis", "Suckling", "200 µm", "MLO",
                 "python -m tools.model.train ", "python -m tools.model.export ", "## Ideas tried",
                 "95 % CI", "balanced", "high_sensitivity"):
        assert text in card, text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchscript_matches_the_trained_network(trained: Path, bundle: Path) -> None:
    model, config, _ = load_trained(trained)
    scripted = torch.jit.load(str(bundle / "model.ts"))
    preprocess = build_preprocess({"input": json.loads((bundle / "metadata.json").read_text())
                                   ["input"]})
    x = torch.stack([preprocess(np.random.default_rng(i).random((90, 70)).astype(np.float32))
                     for i in range(3)])
    with torch.inference_mode():
        for expected, got in zip(model(x), scripted(x), strict=True):
            torch.testing.assert_close(got, expected)


def test_missing_weights_are_reported(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="model.pt missing"):
        export(tmp_path, tmp_path / "out", "x", "1", None, 1, [])

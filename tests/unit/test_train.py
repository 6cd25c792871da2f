"""tools/model/train.py: tiny real training runs on a synthetic data set (no real data needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.model import load_bundle
from tests.support.synthetic_dataset import write_synthetic
from tools.model import nets
from tools.model.export import export
from tools.model.train import load_init, main, model_config, parse_args

TINY = ["--size", "64", "--batch-size", "8", "--threads", "1", "--device", "cpu",
        "--min-epochs", "1", "--val-every", "1", "--patience", "20"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), women=16, size=96, seed=0)


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unet_cv(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unet_cv")
    assert main(["--manifest", str(manifest), "--out", str(out), "--arch", "unet", "--cv", "2",
                 "--epochs", "8", "--patch", "32", *TINY]) == 0
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unet_cross_validation_learns_and_keeps_women_together(unet_cv: Path) -> None:
    metrics = _metrics(unet_cv)
    runs = metrics["training_runs"]
    assert len(runs) == 2 and "final_run" in metrics
    for run in runs:
        assert run["final_loss"] < run["first_loss"]  # it learns
        assert 1 <= run["best_epoch"] <= run["epochs_run"] <= 8
    evaluation = metrics["evaluation"]
    # a bright blob on a smooth background: the lesion net should find most of them
    assert evaluation["normal_vs_abnormal_auc"] > 0.7
    low, high = evaluation["normal_vs_abnormal_auc_ci95"]
    assert low <= evaluation["normal_vs_abnormal_auc"] <= high
    assert len(evaluation["fold_aucs"]) == 2 and evaluation["lesion_hits"][1] == 8
    assert set(evaluation["operating_points"]) == {"balanced", "high_sensitivity"}
    predictions = _predictions(unet_cv)
    fold_of_group: dict[str, set[int]] = {}
    for p in predictions:
        fold_of_group.setdefault(p["group"], set()).add(p["fold"])
        assert 0.0 <= p["score"] <= 1.0
    assert all(len(folds) == 1 for folds in fold_of_group.values())
    assert (unet_cv / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_seed_same_result(manifest: Path, tmp_path: Path) -> None:
    args = ["--manifest", str(manifest), "--arch", "unet", "--split", "60/20/20", "--epochs", "2",
            "--patch", "32", *TINY, "--patience", "0"]  # fixed schedule: the last weights
    main([*args, "--out", str(tmp_path / "a")])
    main([*args, "--out", str(tmp_path / "b")])
    scores_a = [p["score"] for p in _predictions(tmp_path / "a")]
    assert scores_a == [p["score"] for p in _predictions(tmp_path / "b")]
    assert any(s is not None for s in scores_a)
    metrics = _metrics(tmp_path / "a")
    assert "split 60/20/20" in metrics["mode"]
    assert metrics["training_runs"][0]["best_epoch"] == metrics["training_runs"][0]["epochs_run"] == 2


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet-b0"])
def test_cam_architectures_train_and_export(arch: str, manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "trained"
    assert main(["--manifest", str(manifest), "--out", str(out), "--arch", arch,
                 "--split", "60/20/20", "--epochs", "2", "--lr", "1e-3", *TINY]) == 0
    metrics = _metrics(out)
    assert metrics["arch"] == arch and len(metrics["training_runs"]) == 1
    assert np.isfinite(metrics["training_runs"][0]["final_loss"])
    bundle = tmp_path / "bundle"
    export(out, bundle, "tiny", "0.0.1", None, 1, [str(out), "--out", str(bundle)])
    runner = load_bundle(bundle, "cpu")
    image = np.random.default_rng(0).integers(0, 255, (120, 100)).astype(np.float32)
    prediction = runner.predict([image])[0]
    assert 0.0 <= prediction.probability <= 1.0 and prediction.heatmap.shape == (120, 100)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_init_from_bundle_loads_its_weights(unet_cv: Path, manifest: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    export(unet_cv, bundle, "tiny", "0.0.1", None, 1, [str(unet_cv), "--out", str(bundle)])
    state, metadata = load_init(bundle)
    args = parse_args(["--manifest", str(manifest), "--out", str(tmp_path / "ft"),
                       "--init-from", str(bundle), *TINY])
    config = model_config(args, metadata)
    model = nets.build(config)
    model.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 64, 64)
    exported = torch.export.load(str(bundle / "model.pt2")).module()
    with torch.inference_mode():
        expected, got = exported(x), model.eval()(x)
    torch.testing.assert_close(got[0], expected[0])
    # and a fine-tuning run starting from it works end to end
    assert main(["--manifest", str(manifest), "--out", str(tmp_path / "ft"), "--arch", "unet",
                 "--init-from", str(bundle), "--split", "60/20/20", "--epochs", "1",
                 "--patch", "32", *TINY]) == 0
    assert (tmp_path / "ft" / "model.pt").is_file()


def test_arguments_are_checked(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--manifest", str(manifest), "--out", str(tmp_path), "--split", "70/30"])
    with pytest.raises(SystemExit):
        parse_args(["--manifest", str(manifest), "--out", str(tmp_path), "--arch", "vgg"])
    args = parse_args(["--manifest", str(manifest), "--out", str(tmp_path), "--arch",
                       "resnet34", "--heatmap", "cam", "--size", "128"])
    config = model_config(args, None)
    assert config == {**nets.default_config("resnet34", 128), "heatmap": "cam"}
    model = nets.build(config).eval()
    with torch.inference_mode():
        probability, heatmap = model(torch.rand(3, 1, 128, 128))
    assert probability.shape == (3,) and heatmap.shape == (3, 1, 128, 128)
    assert float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0

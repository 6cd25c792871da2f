"""tools/model/ceiling.py (the R1 diagnostic): the network rebuilt from the bundle's TorchScript
file reads as the shipped one, the recorder samples breast cells only, and a ceiling changes the
copy it is set on, never the shipped runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.synthetic import render_breast
from pipelines.model import load_bundle
from tools.model import ceiling

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"


@pytest.fixture(scope="module")
def runner():
    return load_bundle(BUNDLE, "cpu")


def _study() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [render_breast(768, 640, key, rng, lesion=key == "L-MLO").astype(np.float32)
            for key in ("R-MLO", "L-MLO")]


def test_the_rebuilt_network_reads_as_the_shipped_one(runner) -> None:
    plain = ceiling.bounded(runner, BUNDLE, {}, 0.0)
    assert plain.module is not runner.module and not plain.module.bounds
    images = _study()
    shipped = runner.predict(images, ["MLO", "MLO"], [0.2, 0.2], [1, 0])
    rebuilt = plain.predict(images, ["MLO", "MLO"], [0.2, 0.2], [1, 0])
    for a, b in zip(shipped, rebuilt, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-4)
        assert np.abs(a.heatmap - b.heatmap).max() <= 1e-3


def test_the_recorder_samples_breast_cells_and_the_ceiling_changes_only_its_copy(runner) -> None:
    plain = ceiling.bounded(runner, BUNDLE, {}, 0.0)
    recorder = ceiling.Recorder(plain.module, limit=50)
    images = _study()
    before = runner.predict(images, ["MLO", "MLO"], [0.2, 0.2], [1, 0])
    plain.predict(images, ["MLO", "MLO"], [0.2, 0.2], [1, 0])
    samples = recorder.close()
    plain.module.bounds = {}
    assert set(samples) == {"16c", "16"}
    for level, channels in (("16c", 864), ("16", 432)):
        assert len(samples[level]) == 2  # one entry per image of the forward pass
        for cells in samples[level]:
            assert cells.shape == (50, channels)  # the breast has more cells than the limit
    cells = {level: np.concatenate(values) for level, values in samples.items()}
    tight = ceiling.bounded(runner, BUNDLE, cells, 0.25)
    assert set(tight.module.bounds) == {"16c", "16"}
    clipped = tight.predict(images, ["MLO", "MLO"], [0.2, 0.2], [1, 0])
    after = runner.predict(images, ["MLO", "MLO"], [0.2, 0.2], [1, 0])
    assert [p.probability for p in after] == [p.probability for p in before]
    assert any(abs(c.probability - b.probability) > 1e-3
               for c, b in zip(clipped, before, strict=True))

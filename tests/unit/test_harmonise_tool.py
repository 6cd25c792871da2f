"""tools/model/harmonise.py (the H1 diagnostic): the matched reading is the same network fed
through the worker's `input.intensity.reference_quantiles` path, and the shipped runner is left
as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.synthetic import render_breast
from pipelines.model import load_bundle
from tools.model import harmonise

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"


def test_spearman_is_the_rank_correlation() -> None:
    assert harmonise.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert harmonise.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert harmonise.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0]) == pytest.approx(1.0)


def test_the_matched_runner_shares_the_network_and_changes_only_its_input() -> None:
    runner = load_bundle(BUNDLE, "cpu")
    assert "reference_quantiles" not in runner.metadata["input"]["intensity"]
    reference = [round(float(v), 6) for v in np.linspace(0.0, 1.0, harmonise.LEVELS) ** 2]
    matched = harmonise.harmonised(runner, reference)
    assert matched.module is runner.module
    assert matched.metadata["input"]["intensity"]["reference_quantiles"] == reference
    assert "reference_quantiles" not in runner.metadata["input"]["intensity"]
    image = render_breast(768, 640, "L-MLO", np.random.default_rng(5), lesion=True)
    image = image.astype(np.float32)
    plain = runner.predict([image], ["MLO"], [0.2])[0]
    again = runner.predict([image], ["MLO"], [0.2])[0]
    fed = matched.predict([image], ["MLO"], [0.2])[0]
    assert plain.probability == again.probability  # the shipped reading did not change
    assert fed.probability != plain.probability  # the matched one reads other input
    assert 0.0 <= fed.probability <= 1.0 and fed.heatmap.shape == image.shape

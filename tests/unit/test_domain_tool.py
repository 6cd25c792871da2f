"""tools/model/domain.py: a 4-view exam scored as given and under storage, film-like and
pixel-size changes, with the shipped bundle (a synthetic exam written as the tool reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from node.synthetic import render_breast
from pipelines.results import SCREENING_VIEWS
from tools.model import domain

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"


def _write_exam(folder: Path) -> Path:
    folder.mkdir()
    for seed, view_key in enumerate(SCREENING_VIEWS):
        pixels = render_breast(640, 512, view_key, np.random.default_rng(seed), lesion=seed == 1)
        if view_key.startswith("R"):  # the tool reads every breast chest wall left
            pixels = pixels[:, ::-1]
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint16)).save(  # 12-bit values
            folder / f"{view_key}.png")
    return folder


def test_half_resolution_is_the_two_by_two_mean() -> None:
    image = np.arange(30, dtype=np.float32).reshape(5, 6)
    half = domain.half_resolution(image)
    assert half.shape == (2, 3)
    assert half[0, 0] == pytest.approx(np.mean([0, 1, 6, 7]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_storage_changes_do_not_move_the_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    exam = _write_exam(tmp_path / "exam")
    assert domain.main(["--bundle", str(BUNDLE), "--exam", str(exam),
                        "--pixel-spacing", "0.3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.err.strip().splitlines()[-1])
    rows = {row["variant"]: row for row in report["rows"]}
    assert len(rows) == 6
    assert rows["pixel size -20 %"]["pixel_spacing_mm"] == pytest.approx(0.24)
    given = rows["as given"]
    for row in rows.values():
        for view_key in SCREENING_VIEWS:
            assert 0.0 <= row[view_key] <= 1.0
        above = [k for k in SCREENING_VIEWS if row[k] >= report["operating_point"]]
        assert row["above_balanced"] == above
    for view_key in SCREENING_VIEWS:
        assert rows["storage: 16-bit"][view_key] == pytest.approx(given[view_key], abs=1e-3)
        assert rows["storage: half resolution"][view_key] == pytest.approx(given[view_key], abs=0.03)
    # the markdown tables on stdout: per variant, then per view where the heatmap peaks
    table = [line for line in captured.out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) + 2 + len(SCREENING_VIEWS)
    for view_key, where in report["peaks"].items():
        assert where["score"] == pytest.approx(given[view_key], abs=1e-4)
        assert where["peak_mm_from_chest_wall"] >= 0  # on the breast, chest wall left
        assert 0.0 <= where["peak_height"] <= 1.0
        # a view at or above the point has a finding there (its peak is its score), one below none
        assert (where["breast_at_or_above_point"] > 0) == (where["score"] >= report["operating_point"])

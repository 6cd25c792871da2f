"""View selection and orientation: every breast reaches the model chest wall left, lateral up."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from node.runs import InstanceEntry
from node.spool import hash_key
from node.vocabulary import MG_FOR_PRESENTATION, MG_FOR_PROCESSING
from pipelines.orientation import (
    Orientation,
    chest_wall_on_right_from_pixels,
    orientation_for_chest_wall,
    orientation_from_tags,
)
from pipelines.study import select_views
from tools.stack.make_study import PATIENT_ORIENTATION, render_breast


@pytest.mark.parametrize(
    ("laterality", "view", "patient_orientation", "flip_columns", "flip_rows"),
    [
        ("L", "CC", ["A", "R"], False, False),  # standard left CC: chest wall left, lateral up
        ("R", "CC", ["P", "L"], True, False),  # standard right CC: chest wall right
        ("L", "MLO", ["A", "F"], False, False),
        ("R", "MLO", ["P", "F"], True, False),
        ("R", "MLO", ["A", "F"], False, False),  # a right breast stored mirrored: trust the tag
        ("L", "MLO", ["A", "H"], False, True),  # upside down
        ("R", "CC", ["P", "R"], True, True),  # lateral side at the bottom
        ("R", "CC", None, True, False),  # no PatientOrientation: standard display by laterality
        ("L", "MLO", None, False, False),
    ],
)
def test_orientation_from_tags(laterality: str, view: str, patient_orientation: list[str] | None,
                               flip_columns: bool, flip_rows: bool) -> None:
    orientation = orientation_from_tags(laterality, view, patient_orientation)
    assert (orientation.flip_columns, orientation.flip_rows) == (flip_columns, flip_rows)


def test_orientation_is_its_own_inverse() -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    orientation = orientation_from_tags("R", "CC", ["P", "R"])
    flipped = orientation.apply(image)
    assert flipped[0, 0] == image[-1, -1]
    assert np.array_equal(orientation.apply(flipped), image)
    assert orientation.map_point(0.0, 1.0, image.shape) == (3.0, 1.0)
    assert flipped[1, 3] == image[1, 0]  # the point moved with its pixel


@pytest.mark.parametrize("view_key", sorted(PATIENT_ORIENTATION))
def test_tags_and_chest_wall_side_give_one_rule(view_key: str) -> None:
    """The worker (DICOM tags) and training/evaluation (a record's chest-wall side, or the
    pixels when nobody recorded it) reach the same flips for a standard view."""
    laterality, view = view_key.split("-")
    from_tags = orientation_from_tags(laterality, view, list(PATIENT_ORIENTATION[view_key]))
    pixels = render_breast(96, 80, view_key, np.random.default_rng(0), lesion=False).astype(np.float32)
    from_pixels = orientation_for_chest_wall(chest_wall_on_right_from_pixels(pixels))
    assert from_tags == from_pixels == orientation_for_chest_wall(laterality == "R")
    assert from_tags == Orientation(flip_columns=laterality == "R", flip_rows=False)


def _write_manifest(folder: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with open(folder / "manifest.jsonl", "w") as manifest:
        for index, (sop_uid, sop_class, laterality, view) in enumerate(rows):
            entry = InstanceEntry(sop_uid, sop_class, "1.2.3", "1.2", "1.2.840.10008.1.2.1",
                                  laterality, view, hash_key(sop_uid) + ".dcm", 1,
                                  time.time() + index, "a")
            manifest.write(json.dumps(asdict(entry)) + "\n")


def test_selection_takes_one_image_per_screening_view(tmp_path: Path) -> None:
    _write_manifest(tmp_path, [
        ("1.1", MG_FOR_PROCESSING, "R", "CC"),
        ("1.2", MG_FOR_PRESENTATION, "R", "CC"),  # presentation beats processing
        ("1.3", MG_FOR_PROCESSING, "R", "CC"),  # ...even when the processing one comes later
        ("1.4", MG_FOR_PRESENTATION, "L", "MLO"),
        ("1.5", MG_FOR_PRESENTATION, "L", "MLO"),  # a retake replaces the earlier image
        ("1.6", "1.2.840.10008.5.1.4.1.1.13.1.3", "L", "CC"),  # tomosynthesis: not scored
        ("1.7", MG_FOR_PRESENTATION, "L", "XCCL"),  # not a screening view
        ("1.8", MG_FOR_PRESENTATION, "", "MLO"),  # no laterality
    ])
    selected, skipped = select_views(tmp_path)
    assert [(s.entry.view_key, s.entry.sop_uid) for s in selected] == [("R-CC", "1.2"),
                                                                        ("L-MLO", "1.5")]
    reasons = {s.sop_uid: s.reason for s in skipped}
    assert reasons["1.1"] == reasons["1.3"] == reasons["1.4"] == (
        "superseded_by_another_image_of_the_view")
    assert reasons["1.6"] == "sop_class_not_scored"
    assert reasons["1.7"].startswith("view_not_scored")
    assert reasons["1.8"].startswith("view_not_scored")
    assert selected[0].path == tmp_path / (hash_key("1.2") + ".dcm")

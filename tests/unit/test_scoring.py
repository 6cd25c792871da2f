"""Scoring logic: aggregation rules and the heatmap's way back to the source grid.

The predictor here is a transparent stand-in whose heatmap is the oriented image itself, so the
test can see whether the flips applied for the model are undone exactly on the way back.
The real model's grid mapping is proved in test_model_bundle.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from node.runs import FailureKind, InstanceEntry, read_record
from node.spool import Spool, hash_key
from pipelines.results import ModelIdentity
from pipelines.scoring import process_run, score_views
from pipelines.study import decode_view, select_views
from tests.support.settings import make_settings
from tests.support.spooled import spool_run, spooled_views
from tools.stack.make_study import make_study


@dataclass(frozen=True)
class _Prediction:
    probability: float
    heatmap: np.ndarray


class _ImageAsHeatmap:
    """Heatmap = the oriented input, scaled to [0, 1]; probability fixed per call order."""

    identity = ModelIdentity("echo", "0", 0.5)
    last_timings_s: dict[str, float] = {}

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = probabilities
        self.seen: list[np.ndarray] = []

    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        self.seen = images
        out = []
        for image, probability in zip(images, self.probabilities, strict=True):
            scaled = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
            out.append(_Prediction(probability, scaled.astype(np.float32)))
        return out


def test_every_breast_reaches_the_model_chest_wall_left_and_heatmaps_come_back_aligned(
    tmp_path: Path,
) -> None:
    paths = make_study(tmp_path / "study", rows=200, cols=160, seed=9, lesions=["R-CC", "L-MLO"])
    run_dir = spool_run(tmp_path, paths)
    selected, skipped = select_views(run_dir)
    assert skipped == []
    views = [decode_view(s) for s in selected]
    predictor = _ImageAsHeatmap([0.1, 0.7, 0.2, 0.4])
    result, heatmaps = score_views(views, predictor, "1.2.3")
    for image in predictor.seen:
        columns = image.mean(axis=0)
        third = len(columns) // 3
        assert columns[:third].mean() > columns[-third:].mean(), "chest wall (tissue) on the left"
    for view, heatmap in zip(views, heatmaps, strict=True):
        source = dcmread(view.path).pixel_array.astype(np.float32)
        assert heatmap.shape == source.shape
        expected = (source - source.min()) / (source.max() - source.min())
        np.testing.assert_allclose(heatmap, expected, atol=1e-6)


def test_breast_is_max_of_its_views_and_exam_is_max_of_breasts(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", rows=64, cols=48, seed=10)
    views = spooled_views(tmp_path, paths)
    order = [v.entry.view_key for v in views]
    probabilities = {"R-CC": 0.1, "L-CC": 0.7, "R-MLO": 0.3, "L-MLO": 0.2}
    result, _ = score_views(views, _ImageAsHeatmap([probabilities[k] for k in order]), "1.2.3")
    assert result.breast_scores == {"R": 0.3, "L": 0.7}
    assert result.exam_score == 0.7
    assert result.missing_views == ()


def test_missing_views_are_named(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", views=["L-CC"], rows=64, cols=48, seed=11)
    views = spooled_views(tmp_path, paths)
    result, _ = score_views(views, _ImageAsHeatmap([0.5]), "1.2.3")
    assert result.missing_views == ("R-CC", "R-MLO", "L-MLO")
    assert result.breast_scores == {"L": 0.5}


def _claimed_run(spool: Spool, paths: list[Path]) -> str:
    """The study received into the spool and claimed, as the node would hand it to a worker."""
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        received = spool.tmp_dir / "received.part"
        received.write_bytes(path.read_bytes())
        spool.add_instance(received, InstanceEntry(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID),
            str(ds.ImageLaterality), str(ds.ViewPosition),
            hash_key(str(ds.SOPInstanceUID)) + ".dcm", path.stat().st_size, 1.0, "a"))
    [study] = spool.incoming_studies()
    return spool.claim_study(study.study_key, "quiet_period")


class _Crashing(_ImageAsHeatmap):
    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        raise RuntimeError("model exploded")


def test_a_run_fails_with_a_typed_kind_the_record_keeps(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    spool = Spool(settings.spool.dir).ensure()
    crashing = _claimed_run(spool, make_study(tmp_path / "a", views=["R-CC"], rows=64, cols=48,
                                              seed=12))
    assert process_run(settings, spool, crashing, _Crashing([0.5])) == "failed"
    record = read_record(spool.state_dir("failed") / crashing)
    assert record is not None and record.error is not None
    assert record.error.kind is FailureKind.INTERNAL
    assert str(record.error) == "internal: RuntimeError: model exploded"
    assert record.inputs is not None and record.scores is None  # how far it got

    paths = make_study(tmp_path / "b", views=["L-CC"], rows=64, cols=48, seed=13)
    undecodable = _claimed_run(spool, paths)
    for path in (spool.state_dir("queued") / undecodable).glob("*.dcm"):
        path.write_bytes(path.read_bytes()[:400])  # cut inside the header: unreadable
    assert process_run(settings, spool, undecodable, _ImageAsHeatmap([0.5])) == "failed"
    record = read_record(spool.state_dir("failed") / undecodable)
    assert record is not None and record.error is not None
    assert record.error.kind is FailureKind.INPUT
    assert record.error.message.startswith("no scorable view: not_decoded:")

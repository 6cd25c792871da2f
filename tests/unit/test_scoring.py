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
from tests.support.sr_content import text_values
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


class _MloOnly(_ImageAsHeatmap):
    """A stand-in whose bundle declares MLO views only (metadata.json `domain`)."""

    metadata = {"domain": {"views": ["MLO"]}}


def test_images_outside_the_domain_are_scored_or_skipped_as_configured(tmp_path: Path) -> None:
    """`scoring.outside_domain`: by default a CC view outside an MLO-only domain is scored and
    flagged; with `skip` it is recorded as skipped with its reason, the MLO views are scored
    alone, and a study of CC views only ends done with no results, one audit event and one
    warning per view saying it was not scored."""
    from structlog.testing import capture_logs

    from node.audit import read_audit

    paths = make_study(tmp_path / "study", rows=64, cols=48, seed=14)
    for policy in ("score", "skip"):
        settings = make_settings(tmp_path / policy, scoring={"outside_domain": policy})
        spool = Spool(settings.spool.dir).ensure()
        run_id = _claimed_run(spool, paths)
        probabilities = [0.2, 0.6, 0.3, 0.4] if policy == "score" else [0.3, 0.4]
        assert process_run(settings, spool, run_id, _MloOnly(probabilities)) == "done"
        record = read_record(spool.state_dir("done") / run_id)
        assert record is not None and record.inputs is not None and record.scores is not None
        by_view = {f"{i.laterality}-{i.view}": i for i in record.inputs}
        for key in ("R-CC", "L-CC"):
            assert by_view[key].quality_flags == ("outside_domain:view",)
            assert by_view[key].scored is (policy == "score")
            assert by_view[key].reason == (None if policy == "score" else "outside_domain:view")
        assert sorted(record.scores.views) == (["L-CC", "L-MLO", "R-CC", "R-MLO"]
                                               if policy == "score" else ["L-MLO", "R-MLO"])
        assert record.not_scored is None and record.outputs
        assert record.missing_views == ()  # received is not "not available"
        said = {kind: text_values(dcmread(spool.state_dir("done") / run_id / o.file))
                for o in record.outputs for kind in [o.kind] if kind in ("sr", "cad_sr")}
        for key in ("R-CC", "L-CC"):
            caveat = f"{key}: outside the model's declared domain (view)"
            tail = ("its score was not validated on such images" if policy == "score"
                    else "not scored")
            assert any(f"{caveat}; {tail}" in text for text in said["sr"]), said["sr"]
            assert any(f"{caveat}; {tail}." in text for text in said["cad_sr"]), said["cad_sr"]

    settings = make_settings(tmp_path / "cc-only", scoring={"outside_domain": "skip"})
    spool = Spool(settings.spool.dir).ensure()
    run_id = _claimed_run(spool, [p for p in paths if dcmread(p).ViewPosition == "CC"])
    with capture_logs() as logs:
        assert process_run(settings, spool, run_id, _MloOnly([])) == "done"
    record = read_record(spool.state_dir("done") / run_id)
    assert record is not None and record.error is None and record.scores is None
    assert record.not_scored == "no scorable view: outside_domain:view"
    assert record.outputs == () and record.sends == ()
    warnings = [e for e in logs if e["event"] == "input_outside_domain"]
    assert len(warnings) == 2 and all(e["scored"] is False for e in warnings)
    [event] = [e for e in read_audit(settings.audit_path) if e["event"] == "study_not_scored"]
    assert event["run_id"] == run_id and event["reason"] == record.not_scored

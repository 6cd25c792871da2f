"""pipelines/batching.py: the views of concurrent studies through one model, each caller its own
results back in its order, equal to scoring each study alone.

A small real torch network (convolutions, batch norm in eval mode) behind the Predictor
interface, and the shipped bundle through pipelines.model.ModelRunner.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from node import cli
from node.errors import InputError
from node.settings import WorkerSection
from pipelines.batching import (
    WAIT_TIMING,
    BatchingPredictor,
    channels_last,
    shared_predictor,
    shared_shadow,
    use_channels_last,
)
from pipelines.model import load_bundle
from pipelines.results import ModelIdentity
from pipelines.shadow import Shadow
from tests.support.logging_state import logging_restored
from tests.support.settings import write_config
from tools.stack.node_stack import DEFAULT_BUNDLE

LONG_WAIT_S = 60.0  # a batch that must close on its size, never on this


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 1, 3, padding=1))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            norm = self.features[1]
            assert isinstance(norm, torch.nn.BatchNorm2d)
            norm.running_mean.copy_(torch.randn(8, generator=generator))
            norm.running_var.copy_(torch.rand(8, generator=generator) + 0.5)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.features(batch)
        return torch.sigmoid(logits.mean(dim=(1, 2, 3))), torch.sigmoid(logits)


@dataclass(frozen=True)
class Prediction:
    probability: float
    heatmap: np.ndarray


class TinyPredictor:
    """The Predictor interface around TinyNet; records each forward pass it is asked for."""

    identity = ModelIdentity(name="tiny", version="1", operating_point=0.5)
    metadata = {"name": "tiny"}

    def __init__(self) -> None:
        self.net = TinyNet().eval()
        self.calls: list[int] = []
        self.views_seen: list[list[str | None] | None] = []
        self.last_timings_s: dict[str, float] = {}

    def predict(self, images: Sequence[np.ndarray],
                views: Sequence[str | None] | None = None) -> list[Prediction]:
        self.calls.append(len(images))
        self.views_seen.append(list(views) if views is not None else None)
        if not all(np.isfinite(image).all() for image in images):
            raise InputError("pixels not finite")
        started = time.perf_counter()
        batch = torch.stack([F.interpolate(torch.as_tensor(image, dtype=torch.float32)[None, None],
                                           size=(48, 40), mode="bilinear")[0] for image in images])
        with torch.inference_mode():
            probabilities, heatmaps = self.net(batch)
        self.last_timings_s = {"inference": time.perf_counter() - started}
        return [Prediction(float(probabilities[i]), F.interpolate(
            heatmaps[i][None], size=np.shape(image), mode="bilinear")[0, 0].numpy())
            for i, image in enumerate(images)]


def _study(seed: int, shape: tuple[int, int] = (96, 80)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) * (index + 1) for index in range(4)]


def _assert_same(batched: list[Any], alone: list[Any], atol: float = 1e-5) -> None:
    assert len(batched) == len(alone)
    for got, want in zip(batched, alone, strict=True):
        assert got.probability == pytest.approx(want.probability, abs=atol)
        assert got.heatmap.shape == want.heatmap.shape
        np.testing.assert_allclose(got.heatmap, want.heatmap, atol=atol)


def _concurrently(predictor: Any, studies: list[list[np.ndarray]],
                  views: list[list[str | None] | None] | None = None) -> list[Any]:
    """Each study from its own thread, all released at once; each thread's result or error."""
    results: list[Any] = [None] * len(studies)
    barrier = threading.Barrier(len(studies))

    def call(index: int) -> None:
        barrier.wait()
        try:
            kwargs = {"views": views[index]} if views and views[index] is not None else {}
            results[index] = (predictor.predict(studies[index], **kwargs),
                              dict(predictor.last_timings_s))
        except Exception as error:  # handed back to the test
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(studies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_concurrent_studies_are_one_batch_and_each_caller_gets_its_own_results() -> None:
    model = TinyPredictor()
    studies = [_study(seed, shape) for seed, shape in
               zip(range(4), [(96, 80), (64, 64), (120, 100), (80, 96)], strict=True)]
    alone = [model.predict(study) for study in studies]
    model.calls.clear()
    batcher = BatchingPredictor(model, max_views=16, max_wait_s=LONG_WAIT_S)
    try:
        results = _concurrently(batcher, studies)
    finally:
        batcher.close()
    assert model.calls == [16]  # the four studies in one forward pass, closed on its size
    for (predictions, timings), want in zip(results, alone, strict=True):
        _assert_same(predictions, want)
        assert timings[WAIT_TIMING] >= 0
    # Each study carries its share of the one forward pass: the shares add up to it.
    shares = sum(timings["inference"] for _, timings in results)
    assert shares == pytest.approx(model.last_timings_s["inference"], rel=1e-6)
    assert batcher.stats.batches == 1 and batcher.stats.views == 16


def test_a_batch_closes_on_the_timeout_with_fewer_views() -> None:
    model = TinyPredictor()
    study = _study(11)
    alone = model.predict(study)
    model.calls.clear()
    batcher = BatchingPredictor(model, max_views=16, max_wait_s=0.05)
    try:
        first = batcher.predict(study)
        second = batcher.predict(study[:2])
    finally:
        batcher.close()
    assert model.calls == [4, 2]
    _assert_same(first, alone)
    _assert_same(second, alone[:2])


def test_a_study_is_never_split_between_forward_passes() -> None:
    model = TinyPredictor()
    studies = [_study(20 + seed) for seed in range(3)]
    alone = [model.predict(study) for study in studies]
    model.calls.clear()
    batcher = BatchingPredictor(model, max_views=10, max_wait_s=0.5)
    try:
        results = _concurrently(batcher, studies)
    finally:
        batcher.close()
    # Three studies of four views in passes of at most ten: 8 + 4 when all three were waiting
    # together, 4 + 8 or 4 + 4 + 4 when one came late; never a study cut in two.
    assert sum(model.calls) == 12 and all(size in (4, 8) for size in model.calls)
    for (predictions, _), want in zip(results, alone, strict=True):
        _assert_same(predictions, want)


class CrossViewPredictor(TinyPredictor):
    """Reads each image against another of the same call (`contralateral`, as a bundle that
    compares the breasts), and records the per-image arguments it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs_seen: list[dict[str, Any]] = []

    def predict(self, images: Sequence[np.ndarray],
                views: Sequence[str | None] | None = None,
                pixel_spacings: Sequence[float | None] | None = None,
                contralateral: Sequence[int | None] | None = None) -> list[Prediction]:
        self.kwargs_seen.append({"views": views, "pixel_spacings": pixel_spacings,
                                 "contralateral": contralateral})
        own = super().predict(images, views)
        others = contralateral or [None] * len(images)
        return [Prediction(p.probability - 0.5 * (own[j].probability if j is not None else 0.2),
                           p.heatmap) for p, j in zip(own, others, strict=True)]


def test_per_image_arguments_follow_their_images_into_the_batch() -> None:
    model = CrossViewPredictor()
    studies = [_study(70), _study(71)]
    pairs = [1, 0, 3, 2]  # R-CC <-> L-CC, R-MLO <-> L-MLO
    alone = [model.predict(studies[0], ["CC", "CC", "MLO", "MLO"], [0.1, 0.1, 0.2, 0.2], pairs),
             model.predict(studies[1], ["CC", "CC", "MLO", "MLO"], None, pairs)]
    model.kwargs_seen.clear()
    batcher = BatchingPredictor(model, max_views=8, max_wait_s=LONG_WAIT_S)
    try:
        results: list[Any] = [None, None]
        barrier = threading.Barrier(2)

        def call(index: int, spacings: list[float | None] | None) -> None:
            barrier.wait()
            results[index] = batcher.predict(studies[index], ["CC", "CC", "MLO", "MLO"],
                                             pixel_spacings=spacings, contralateral=pairs)

        threads = [threading.Thread(target=call, args=(0, [0.1, 0.1, 0.2, 0.2])),
                   threading.Thread(target=call, args=(1, None))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        batcher.close()
    [seen] = model.kwargs_seen
    # Each study's pairs moved to where its images are in the batch, whichever came first.
    assert seen["contralateral"] == [1, 0, 3, 2, 5, 4, 7, 6]
    assert seen["pixel_spacings"] in ([0.1, 0.1, 0.2, 0.2, None, None, None, None],
                                      [None, None, None, None, 0.1, 0.1, 0.2, 0.2])
    for predictions, want in zip(results, alone, strict=True):
        _assert_same(predictions, want)


def test_arguments_the_wrapped_predictor_does_not_take_are_dropped() -> None:
    model = TinyPredictor()  # views only
    study = _study(80)
    batcher = BatchingPredictor(model, max_views=8, max_wait_s=0.01)
    try:
        got = batcher.predict(study, ["CC", "CC", "MLO", "MLO"], pixel_spacings=[0.1] * 4,
                              contralateral=[1, 0, 3, 2])
    finally:
        batcher.close()
    assert model.views_seen == [["CC", "CC", "MLO", "MLO"]]
    _assert_same(got, model.predict(study))


def test_without_batch_views_each_study_is_its_own_forward_pass() -> None:
    model = TinyPredictor()
    studies = [_study(30 + seed) for seed in range(3)]
    alone = [model.predict(study) for study in studies]
    model.calls.clear()
    batcher = BatchingPredictor(model, max_views=0)
    try:
        results = _concurrently(batcher, studies)
    finally:
        batcher.close()
    assert model.calls == [4, 4, 4]
    for (predictions, _), want in zip(results, alone, strict=True):
        _assert_same(predictions, want)


def test_a_bad_study_fails_alone() -> None:
    model = TinyPredictor()
    good, bad = _study(40), _study(41)
    bad[2][5, 5] = np.nan
    alone = model.predict(good)
    model.calls.clear()
    batcher = BatchingPredictor(model, max_views=8, max_wait_s=LONG_WAIT_S)
    try:
        results = _concurrently(batcher, [good, bad])
    finally:
        batcher.close()
    assert isinstance(results[1], InputError)
    predictions, _ = results[0]
    _assert_same(predictions, alone)
    assert model.calls == [8, 4, 4]  # the batch, then each study again alone
    assert batcher.stats.retried_alone == 1


def test_views_reach_the_model_beside_their_images() -> None:
    model = TinyPredictor()
    batcher = BatchingPredictor(model, max_views=8, max_wait_s=LONG_WAIT_S)
    try:
        results = _concurrently(batcher, [_study(50), _study(51)],
                                views=[["CC", "CC", "MLO", "MLO"], None])
    finally:
        batcher.close()
    assert all(not isinstance(r, Exception) for r in results)
    [seen] = model.views_seen
    assert seen is not None
    # Whichever study came first, each image has its own study's view (None: none given).
    assert sorted(seen, key=str) == sorted(["CC", "CC", "MLO", "MLO", None, None, None, None],
                                           key=str)
    assert seen[:4] in (["CC", "CC", "MLO", "MLO"], [None] * 4)


def test_the_shipped_bundle_batched_scores_as_alone() -> None:
    runner = load_bundle(DEFAULT_BUNDLE, "cpu")
    rng = np.random.default_rng(3)
    studies = [[(rng.random((256, 208)) * 4000).astype(np.uint16) for _ in range(4)]
               for _ in range(2)]
    alone = [runner.predict(study) for study in studies]
    batcher = BatchingPredictor(runner, max_views=8, max_wait_s=LONG_WAIT_S)
    try:
        results = _concurrently(batcher, studies)
    finally:
        batcher.close()
    assert batcher.stats.sizes == [8]
    for (predictions, timings), want in zip(results, alone, strict=True):
        _assert_same(predictions, want, atol=1e-4)
        assert {"preprocess", "inference", "heatmap", WAIT_TIMING} <= set(timings)
    assert not use_channels_last(runner)  # CPU: the weights stay as they are
    # What the batcher does on CUDA, here on the CPU: the exported program in channels_last
    # still loads its weights and gives the same answers.
    assert channels_last(runner.module)
    weights = [p for p in runner.module.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    _assert_same(runner.predict(studies[0]), alone[0], atol=1e-4)


def test_a_process_shares_one_batcher_only_when_it_scores_studies_at_once() -> None:
    model = TinyPredictor()
    assert WorkerSection().thread_count == 1
    assert WorkerSection(batch_views=16).thread_count == 5
    assert WorkerSection(batch_views=4).thread_count == 2
    assert shared_predictor(model, WorkerSection()) is model
    worker = WorkerSection(threads=3, batch_views=8, batch_wait_ms=20)
    first = shared_predictor(model, worker)
    assert isinstance(first, BatchingPredictor)
    assert shared_predictor(model, worker) is first
    assert (first.max_views, first.max_wait_s) == (8, 0.02)
    assert first.identity == model.identity and first.metadata == model.metadata
    shadow = shared_shadow(Shadow(predictor=model), worker)
    assert shadow is not None and shadow.predictor is first
    assert shared_shadow(Shadow(predictor=None, error="x"), worker) == Shadow(None, "x")
    first.close()


def test_one_thread_has_nothing_to_batch_with() -> None:
    model = TinyPredictor()
    assert WorkerSection(threads=1, batch_views=16).thread_count == 1
    assert shared_predictor(model, WorkerSection(threads=1, batch_views=16)) is model


def test_worker_options_out_of_range_or_threads_with_processes_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "node.yaml", worker={"batch_views": 16})
    with logging_restored():
        assert cli.main(["worker", "--config", str(config), "--batch-views", "-1"]) == 2
        assert "worker.batch_views" in capsys.readouterr().err
        # batch_views 16: five studies in flight in one process, so not two processes.
        assert cli.main(["worker", "--config", str(config), "--concurrency", "2"]) == 2
        assert "one `mammo-node worker` per process" in capsys.readouterr().err

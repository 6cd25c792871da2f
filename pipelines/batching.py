"""The batching worker: one model per worker process, fed by every study in flight.

With `worker.threads > 1` (settings) a `mammo-node worker` process scores several studies at once
on Celery's threads pool. Each study decodes its views on its own thread (the next study's
decode overlaps the model, the previous study's write and send too) and hands them to the
process's one `BatchingPredictor`, whose thread runs them through the model together with the
views of the other studies: a batch closes at `worker.batch_views` views or `worker.batch_wait_ms`
after its oldest view arrived, whichever comes first. A study's views are never split between
forward passes (a model may read one breast against the other). Every caller gets exactly its
own predictions back, in its order; a batch that fails is run again study by study, so a bad
study fails alone. Without `worker.batch_views` each study's views are one forward pass, as without
this module, but the model still runs on one thread (a ModelRunner is not thread-safe).

`BatchingPredictor` wraps any object with the Predictor interface (pipelines/scoring.py:
`predict(images)`, optionally with the per-image keyword arguments of
pipelines.model.ModelRunner.predict, `identity`, `last_timings_s`, and `metadata` when it has
one), so another bundle format plugs in unchanged.
On CUDA it also puts the wrapped model's weights in channels_last (`use_channels_last`); the
runner's own autocast (half precision on CUDA only) is left as it is.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.logs import get_logger
from node.settings import WorkerSection
from pipelines.results import ModelIdentity
from pipelines.shadow import Shadow

log = get_logger("pipelines.batching")

# The timings a wrapped predictor reports per call (pipelines.model.ModelRunner.predict), shared
# out among the studies of a batch in proportion to their views.
SHARED_TIMINGS = ("preprocess", "inference", "heatmap")
# Seconds a study's first view waited in the batcher before its batch started.
WAIT_TIMING = "batch_wait"


# Keyword arguments of a predictor's `predict` with one value per image (pipelines/model.py:
# ModelRunner.predict), joined across the studies of a batch; CROSS_VIEW ones hold, per image, the
# index of another image of the same call (the other breast's view), moved with the batch.
PER_IMAGE = ("views", "pixel_spacings", "contralateral")
CROSS_VIEW = ("contralateral",)


@dataclass(eq=False)  # compared and hashed by identity
class _Request:
    """One caller's views (with their per-image arguments), waiting for their predictions."""

    images: list[np.ndarray]
    per_image: dict[str, list[Any]]
    submitted: float = field(default_factory=time.monotonic)
    results: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


@dataclass
class BatchStats:
    """What the batcher did since it started (for logs, tests and the benchmark)."""

    batches: int = 0
    views: int = 0
    sizes: list[int] = field(default_factory=list)  # views per forward pass, the last 1000
    retried_alone: int = 0


class BatchingPredictor:
    """A Predictor that batches the views of concurrent callers through one wrapped predictor.

    A caller's views always go through the model together, in one forward pass (a model that
    reads a view against the other breast's needs both); a batch takes callers in arrival order
    while their views fit in `max_views` (a caller with more views than that goes alone).
    `max_views` 0: each caller's views are one forward pass (calls are only serialised).
    `max_wait_s`: how long the oldest waiting caller holds its batch open for more views.
    """

    def __init__(self, predictor: Any, max_views: int = 0, max_wait_s: float = 0.0,
                 name: str = "model") -> None:
        if max_views < 0 or max_wait_s < 0:
            raise ValueError("max_views and max_wait_s must not be negative")
        self.predictor = predictor
        self.max_views = max_views
        self.max_wait_s = max_wait_s
        self.name = name
        self.stats = BatchStats()
        accepted = inspect.signature(predictor.predict).parameters
        # What the wrapped predict takes; the rest is dropped, as pipelines/study.py:predict_views
        # does for a predictor without them.
        self._accepted = tuple(key for key in PER_IMAGE if key in accepted)
        self._queue: queue.Queue[object] = queue.Queue()
        self._local = threading.local()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # --- the Predictor interface ---------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        identity: ModelIdentity = self.predictor.identity
        return identity

    @property
    def metadata(self) -> Any:
        return getattr(self.predictor, "metadata", None)

    @property
    def last_timings_s(self) -> dict[str, float]:
        """The timings of this thread's last call (each caller its own)."""
        timings: dict[str, float] = getattr(self._local, "timings", {})
        return timings

    @last_timings_s.setter
    def last_timings_s(self, value: dict[str, float]) -> None:
        self._local.timings = value

    def predict(self, images: Sequence[np.ndarray],
                views: Sequence[str | None] | None = None,
                pixel_spacings: Sequence[float | None] | None = None,
                contralateral: Sequence[int | None] | None = None) -> list[Any]:
        """The wrapped predictor's predictions of `images`, in order, batched with the views
        other threads hand in meanwhile. The keyword arguments, one value per image, are those
        of pipelines.model.ModelRunner.predict (`contralateral`: indices into `images`). Raises
        what the wrapped predictor raised for these images."""
        if not images:
            self.last_timings_s = {}
            return []
        if self._closed:
            raise RuntimeError(f"batcher {self.name} is closed")
        given = {"views": views, "pixel_spacings": pixel_spacings, "contralateral": contralateral}
        per_image = {key: list(value) for key, value in given.items()
                     if value is not None and key in self._accepted}
        for key, value in per_image.items():
            if len(value) != len(images):
                raise ValueError(f"{key}: {len(value)} values for {len(images)} images")
        request = _Request(list(images), per_image)
        self._queue.put(request)
        request.done.wait()
        self.last_timings_s = dict(request.timings)
        if request.error is not None:
            raise request.error
        return request.results

    def close(self, timeout_s: float = 30.0) -> None:
        """Run what is queued, then stop the batcher's thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    # --- the batcher's thread ------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list[_Request] = []
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, _Request)
                pending.append(item)
            stopping = self._collect(pending) or stopping
            batch = self._take(pending)
            try:
                self._run(batch)
            except Exception as error:  # never a caller left waiting, never a dead batcher
                log.exception("model_batch_crashed", model=self.name,
                              views=sum(len(r.images) for r in batch))
                for request in batch:
                    if not request.done.is_set():
                        request.error = error
                        request.done.set()

    def _collect(self, pending: list[_Request]) -> bool:
        """Add queued callers to `pending` until their views fill a batch or the oldest has
        waited `max_wait_s`; True when the stop marker came meanwhile."""
        if not self.max_views:
            return False
        deadline = pending[0].submitted + self.max_wait_s
        while sum(len(r.images) for r in pending) < self.max_views:
            try:
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else \
                    self._queue.get_nowait()  # a late batch still takes what is already there
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            assert isinstance(item, _Request)
            pending.append(item)
        return False

    def _take(self, pending: list[_Request]) -> list[_Request]:
        """The next batch, out of `pending`: callers in arrival order while their views fit."""
        batch = [pending.pop(0)]
        views = len(batch[0].images)
        while self.max_views and pending and views + len(pending[0].images) <= self.max_views:
            views += len(pending[0].images)
            batch.append(pending.pop(0))
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """One forward pass over the batch's views; on failure each caller's views again alone,
        so one bad study fails alone."""
        started = time.monotonic()
        for request in batch:
            request.timings[WAIT_TIMING] = started - request.submitted
        try:
            predictions, timings = self._predict(batch)
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                batch[0].done.set()
                return
            self.stats.retried_alone += 1
            log.warning("model_batch_failed_retrying_alone", model=self.name,
                        views=sum(len(r.images) for r in batch), studies=len(batch),
                        reason=type(error).__name__)
            for request in batch:
                try:
                    predictions, timings = self._predict([request])
                except Exception as alone:
                    request.error = alone
                    request.done.set()
                else:
                    self._deliver([request], predictions, timings)
            return
        self._deliver(batch, predictions, timings)
        views = len(predictions)
        self.stats.batches += 1
        self.stats.views += views
        self.stats.sizes = [*self.stats.sizes[-999:], views]
        log.info("model_batch", model=self.name, views=views, studies=len(batch),
                 waited_s=round(started - batch[0].submitted, 3),
                 inference_s=round(timings.get("inference", 0.0), 3))

    def _predict(self, batch: list[_Request]) -> tuple[list[Any], dict[str, float]]:
        images = [image for request in batch for image in request.images]
        kwargs: dict[str, list[Any]] = {}
        for key in self._accepted:
            if not any(key in request.per_image for request in batch):
                continue
            joined: list[Any] = []
            for request in batch:
                values = request.per_image.get(key, [None] * len(request.images))
                if key in CROSS_VIEW:  # indices into the caller's images: into the batch
                    offset = len(joined)
                    values = [None if v is None else offset + int(v) for v in values]
                joined.extend(values)
            kwargs[key] = joined
        predictions = list(self.predictor.predict(images, **kwargs))
        if len(predictions) != len(images):
            raise RuntimeError(f"the model answered {len(predictions)} predictions for "
                               f"{len(images)} images")
        return predictions, dict(getattr(self.predictor, "last_timings_s", {}) or {})

    def _deliver(self, batch: list[_Request], predictions: list[Any],
                 timings: dict[str, float]) -> None:
        """Each caller its own predictions, in order; the batch's times shared out by views."""
        start = 0
        for request in batch:
            count = len(request.images)
            request.results = predictions[start:start + count]
            start += count
            for key in SHARED_TIMINGS:
                if key in timings:
                    request.timings[key] = timings[key] * count / len(predictions)
            request.done.set()


def use_channels_last(predictor: Any) -> bool:
    """On CUDA, the wrapped model's 4-D weights in channels_last (convolutions then run in NHWC,
    what tensor cores want); True when done. A model on the CPU, or one without a torch
    `module`, is left alone."""
    device = getattr(predictor, "device", None)
    if getattr(device, "type", None) != "cuda":
        return False
    return channels_last(getattr(predictor, "module", None))


def channels_last(module: object) -> bool:
    """A torch module's 4-D weights in channels_last, in place (its outputs stay the same);
    False for anything else."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return False
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return True


_shared: dict[int, BatchingPredictor] = {}
_shared_lock = threading.Lock()


def shared_predictor(predictor: Any, worker: WorkerSection, name: str = "model") -> Any:
    """The predictor a task of this process uses: `predictor` itself when the process scores
    one study at a time (`worker.thread_count` 1: nothing to batch with), else the process's
    one BatchingPredictor around it (created on first use, kept)."""
    if predictor is None or worker.thread_count <= 1:
        return predictor
    max_wait_s = worker.batch_wait_ms / 1000.0
    with _shared_lock:
        batcher = _shared.get(id(predictor))
        if batcher is None or batcher.predictor is not predictor:
            channels_last = use_channels_last(predictor)
            batcher = BatchingPredictor(predictor, worker.batch_views, max_wait_s, name)
            _shared[id(predictor)] = batcher
            log.info("model_batcher_started", model=name, threads=worker.thread_count,
                     batch_views=worker.batch_views, batch_wait_ms=worker.batch_wait_ms,
                     channels_last=channels_last)
        return batcher


def shared_shadow(shadow: Shadow | None, worker: WorkerSection) -> Shadow | None:
    """The shadow bundle as the tasks of this process use it: with `worker.threads` > 1 its
    model too is called through one BatchingPredictor (never by two threads at once)."""
    if shadow is None or shadow.predictor is None or worker.thread_count <= 1:
        return shadow
    return Shadow(predictor=shared_predictor(shadow.predictor, worker, "shadow"),
                  error=shadow.error)

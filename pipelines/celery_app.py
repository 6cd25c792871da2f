"""The worker side of Celery: the app, the score task, and the model loaded once per process.

The config file comes from the environment (`MAMMO_NODE_CONFIG`), set by `mammo-node worker`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from node import metrics
from node.drift import normal_exam_flag_rate
from node.leases import Leases
from node.logs import configure_logging, get_logger
from node.monitoring import forget_process
from node.queueing import SCORE_TASK_NAME, celery_config
from node.settings import Settings, load_settings
from node.spool import Spool
from pipelines.shadow import Shadow, load_shadow

if TYPE_CHECKING:
    from pipelines.model import ModelRunner

log = get_logger("pipelines.worker")

CONFIG_ENV = "MAMMO_NODE_CONFIG"
PIPELINE_ENV = "MAMMO_NODE_PIPELINE"  # `mammo-node worker --pipeline NAME`; unset: the implicit one

app = Celery("mammo-node-worker")


class _Process:
    """What one worker process loads once: its settings and its model."""

    settings: Settings | None = None  # the pipeline's (Settings.for_pipeline)
    pipeline: str | None = None
    runner: ModelRunner | None = None
    shadow: Shadow | None = None
    shadow_loaded = False
    leases: Leases | None = None  # claims.mode: redis (one Redis client per process)
    leases_made = False


def configure(settings: Settings, pipeline: str | None = None) -> Celery:
    """The app for the worker of one pipeline (None: the implicit one); KeyError when unknown."""
    app.conf.update(celery_config(settings))
    _Process.settings = settings.for_pipeline(pipeline)
    _Process.pipeline = pipeline
    return app


def _settings() -> Settings:
    if _Process.settings is None:
        configure(load_settings(os.environ[CONFIG_ENV]), os.environ.get(PIPELINE_ENV) or None)
    assert _Process.settings is not None
    return _Process.settings


def _leases() -> Leases | None:
    """The run leases of this process (None with local claims)."""
    if not _Process.leases_made:
        _Process.leases = Leases.from_settings(_settings())
        _Process.leases_made = True
    return _Process.leases


def _shadow() -> Shadow | None:
    """The pipeline's shadow bundle, loaded once per process (a load failure is kept and
    recorded in each run's record as the shadow's error)."""
    if not _Process.shadow_loaded:
        shadow_model = _settings().shadow_model
        if shadow_model is not None:
            _Process.shadow = load_shadow(shadow_model.bundle_dir, shadow_model.device,
                                          shadow_model.operating_point)
        _Process.shadow_loaded = True
    return _Process.shadow


def _runner() -> ModelRunner:
    """The model of this process, loaded on first use and kept (one load per worker process)."""
    if _Process.runner is None:
        from pipelines.model import load_bundle

        settings = _settings()
        runner = load_bundle(settings.model.bundle_dir, settings.model.device,
                             settings.model.operating_point)
        log.info("model_loaded", model=runner.identity.name, version=runner.identity.version,
                 pipeline=_Process.pipeline or "default",
                 device=str(runner.device), pid=os.getpid())
        _Process.runner = runner
    return _Process.runner


# Celery ships no type hints: its decorators are untyped.
@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_model_in_child(**_: Any) -> None:
    configure_logging(os.environ.get("MAMMO_NODE_LOG_LEVEL", "INFO"))
    runner = _runner()
    identity = runner.identity
    _shadow()
    _leases()  # before any task: threads of a threads pool then share one client
    # Summed over the pool by the worker's endpoint and heartbeat (node/monitoring.py).
    metrics.MODEL_LOADED.labels(model=identity.name, model_version=identity.version).set(1)
    expected = normal_exam_flag_rate(runner.metadata, identity.operating_point_name)
    if expected is not None:  # the recall-rate alerts compare each source's share against it
        metrics.NORMAL_EXAM_FLAG_RATE.labels(
            model=identity.name, model_version=identity.version,
            operating_point=identity.operating_point_name).set(expected)


def load_in_this_process() -> None:
    """A threads pool (`worker.threads` > 1) runs the tasks in the worker's own process: the
    model is loaded there, before Celery starts, as a prefork child does at its start."""
    _load_model_in_child()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _forget_child(**_: Any) -> None:
    forget_process(os.getpid())


@app.task(name=SCORE_TASK_NAME, bind=True, acks_late=True,  # type: ignore[untyped-decorator]
          reject_on_worker_lost=True)
def score_study(self: Any, run_id: str) -> None:
    """Celery entry point: message carries the run id only. Results are ignored by design."""
    from pipelines.batching import shared_predictor, shared_shadow
    from pipelines.scoring import process_run

    settings = _settings()
    # worker.threads > 1: this process's one batcher, shared by the studies in flight.
    process_run(settings, Spool(settings.spool.dir), run_id,
                shared_predictor(_runner(), settings.worker),
                pipeline=_Process.pipeline, shadow=shared_shadow(_shadow(), settings.worker),
                leases=_leases())


if CONFIG_ENV in os.environ:
    _settings()

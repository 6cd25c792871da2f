"""The worker side of Celery: the app, the score task, and the model loaded once per process.

The config file comes from the environment (`MAMMO_NODE_CONFIG`), set by `mammo-node worker`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import worker_process_init

from node.logs import configure_logging, get_logger
from node.queueing import SCORE_TASK_NAME, celery_config
from node.settings import Settings, load_settings
from node.spool import Spool

if TYPE_CHECKING:
    from pipelines.model import ModelRunner

log = get_logger("pipelines.worker")

CONFIG_ENV = "MAMMO_NODE_CONFIG"

app = Celery("mammo-node-worker")


class _Process:
    """What one worker process loads once: its settings and its model."""

    settings: Settings | None = None
    runner: ModelRunner | None = None


def configure(settings: Settings) -> Celery:
    app.conf.update(celery_config(settings))
    _Process.settings = settings
    return app


def _settings() -> Settings:
    if _Process.settings is None:
        configure(load_settings(os.environ[CONFIG_ENV]))
    assert _Process.settings is not None
    return _Process.settings


def _runner() -> ModelRunner:
    """The model of this process, loaded on first use and kept (one load per worker process)."""
    if _Process.runner is None:
        from pipelines.model import load_bundle

        settings = _settings()
        runner = load_bundle(settings.model.bundle_dir, settings.model.device)
        log.info("model_loaded", model=runner.identity.name, version=runner.identity.version,
                 device=str(runner.device), pid=os.getpid())
        _Process.runner = runner
    return _Process.runner


# Celery ships no type hints: its decorators are untyped.
@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_model_in_child(**_: Any) -> None:
    configure_logging(os.environ.get("MAMMO_NODE_LOG_LEVEL", "INFO"))
    _runner()


@app.task(name=SCORE_TASK_NAME, bind=True, acks_late=True,  # type: ignore[untyped-decorator]
          reject_on_worker_lost=True)
def score_study(self: Any, run_id: str) -> None:
    """Celery entry point: message carries the run id only. Results are ignored by design."""
    from pipelines.scoring import process_run

    settings = _settings()
    process_run(settings, Spool(settings.spool.dir), run_id, _runner())


if CONFIG_ENV in os.environ:
    _settings()

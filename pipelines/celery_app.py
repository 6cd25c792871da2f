"""The worker side of Celery: the app, the score task, and the model loaded once per process.

The config file comes from the environment (`MAMMO_NODE_CONFIG`), set by `mammo-node worker`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from node.logs import configure_logging, get_logger
from node.queueing import SCORE_TASK_NAME, celery_config
from node.settings import Settings, load_settings
from node.spool import Spool

log = get_logger("pipelines.worker")

CONFIG_ENV = "MAMMO_NODE_CONFIG"

app = Celery("mammo-node-worker")
_state: dict[str, Any] = {}


def configure(settings: Settings) -> Celery:
    app.conf.update(celery_config(settings))
    _state["settings"] = settings
    return app


def _settings() -> Settings:
    if "settings" not in _state:
        configure(load_settings(os.environ[CONFIG_ENV]))
    return _state["settings"]


def _runner() -> Any:
    """The model of this process, loaded on first use and kept (one load per worker process)."""
    if "runner" not in _state:
        from pipelines.model import load_bundle

        settings = _settings()
        _state["runner"] = load_bundle(settings.model.bundle_dir, settings.model.device)
        identity = _state["runner"].identity
        log.info("model_loaded", model=identity.name, version=identity.version,
                 device=str(_state["runner"].device), pid=os.getpid())
    return _state["runner"]


@worker_process_init.connect
def _load_model_in_child(**_: Any) -> None:
    configure_logging(os.environ.get("MAMMO_NODE_LOG_LEVEL", "INFO"))
    _runner()


@app.task(name=SCORE_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def score_study(self: Any, run_id: str) -> None:
    """Celery entry point: message carries the run id only. Results are ignored by design."""
    from pipelines.scoring import process_run

    settings = _settings()
    process_run(settings, Spool(settings.spool.dir), run_id, _runner())


if CONFIG_ENV in os.environ:
    _settings()

"""Celery as the doorbell: the configuration shared by publisher and workers, and the publisher.

Messages carry a run id only (never pixels, never PHI). The node never imports pipelines/: it
sends the task by name.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from node.errors import TransientError
from node.settings import Settings

SCORE_TASK_NAME = "pipelines.score_study"


def celery_config(settings: Settings) -> dict[str, Any]:
    """One place for the contract of DESIGN.md: JSON only, late acks, prefetch 1, no results."""
    broker = settings.broker
    # The visibility timeout must exceed the task time limit, or Redis redelivers a task that is
    # still running (measured: a task longer than the timeout ran three times).
    visibility_timeout_s = int(broker.task_time_limit_s * 2 + 60)
    return {
        "broker_url": broker.url_with_password(),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": broker.publish_timeout_s,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            "socket_timeout": broker.publish_timeout_s,
            "socket_connect_timeout": broker.publish_timeout_s,
            "max_retries": 1,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": broker.queue,
        "task_time_limit": broker.task_time_limit_s,
        "task_soft_time_limit": broker.task_time_limit_s * 0.9,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "broker_heartbeat": 0,
    }


def build_publisher(settings: Settings) -> Celery:
    app = Celery("mammo-node-publisher", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def publish_run(app: Celery, settings: Settings, run_id: str) -> None:
    """Send the score task for a run; TransientError if the broker cannot take it now."""
    try:
        app.send_task(
            SCORE_TASK_NAME,
            args=[run_id],
            queue=settings.broker.queue,
            retry=False,
        )
    except Exception as error:  # kombu raises many types for one cause: the broker is away
        raise TransientError(f"broker unavailable: {type(error).__name__}") from error

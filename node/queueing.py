"""Celery as the doorbell: the configuration shared by publisher and workers, and the publisher.

Messages carry a run id only (never pixels, never PHI). The node never imports pipelines/: it
sends the task by name.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import redis
from celery import Celery

from node.errors import TransientError
from node.settings import Settings

SCORE_TASK_NAME = "pipelines.score_study"
# kombu's Redis transport keeps one list per priority step: "<queue>" and "<queue>\x06\x16<n>".
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
_UNACKED_KEY = "unacked"  # kombu's defaults for messages taken by a worker and not acked yet
_UNACKED_INDEX_KEY = "unacked_index"


def celery_config(settings: Settings) -> dict[str, Any]:
    """One place for the Celery contract (docs/ARCHITECTURE.md).

    JSON only, late acks, prefetch 1, no results.
    """
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
        # A pool child loads the model before it says it is up; Celery's default 4 s is too
        # short on a loaded host and ends in a loop of children killed before they start.
        "worker_proc_alive_timeout": 120.0,
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


def pipeline_queue(settings: Settings, pipeline: str | None) -> str:
    """The queue of a pipeline's runs (`broker.queue` for the implicit one, `<broker.queue>.<name>`
    for a named one; `mammo-node worker --pipeline NAME` consumes it); KeyError when unknown."""
    found = settings.pipeline(pipeline)
    if found is None:
        raise KeyError(pipeline)
    return found.queue


def publish_run(app: Celery, settings: Settings, run_id: str, pipeline: str | None = None
                ) -> None:
    """Send the score task for a run to its pipeline's queue; TransientError if the broker
    cannot take it now."""
    try:
        app.send_task(
            SCORE_TASK_NAME,
            args=[run_id],
            queue=pipeline_queue(settings, pipeline),
            retry=False,
        )
    except Exception as error:  # kombu raises many types for one cause: the broker is away
        raise TransientError(f"broker unavailable: {type(error).__name__}") from error


def broker_client(settings: Settings) -> redis.Redis:
    """A Redis client on the broker, with the publish timeout (the caller closes it)."""
    return redis.Redis.from_url(
        settings.broker.url_with_password(),
        socket_timeout=settings.broker.publish_timeout_s,
        socket_connect_timeout=settings.broker.publish_timeout_s,
    )


def queue_depth(settings: Settings) -> int:
    """Score messages waiting in the broker queue (every priority list); TransientError when the
    broker cannot answer."""
    keys = _queue_keys(settings)
    try:
        client = broker_client(settings)
        try:
            return sum(int(client.llen(key)) for key in keys)
        finally:
            client.close()
    except redis.RedisError as error:
        raise TransientError(f"broker unavailable: {type(error).__name__}") from error


def waiting_run_ids(settings: Settings, reserved_within_s: float = 0.0,
                    now: float | None = None) -> set[str]:
    """Run ids whose score message is in the broker: waiting in the queue, or reserved by a
    worker less than `reserved_within_s` ago and not finished yet.

    The reconciler asks this before publishing a queued run again, so a long queue is never
    flooded with duplicates: only runs whose message is gone (Redis restarted empty) or stuck
    with a worker that has not started it for too long (it died after taking it) are published
    again. A reserved message is in kombu's `unacked` hash, its delivery time in
    `unacked_index`. TransientError when the broker cannot answer.
    """
    keys = _queue_keys(settings)
    since = (time.time() if now is None else now) - reserved_within_s
    try:
        client = redis.Redis.from_url(
            settings.broker.url_with_password(),
            socket_timeout=settings.broker.publish_timeout_s,
            socket_connect_timeout=settings.broker.publish_timeout_s,
        )
        try:
            raw_messages: list[Any] = [raw for key in keys for raw in client.lrange(key, 0, -1)]
            if reserved_within_s > 0:
                recent: list[Any] = list(client.zrangebyscore(_UNACKED_INDEX_KEY, since, "+inf"))
                if recent:
                    for entry in client.hmget(_UNACKED_KEY, recent):
                        if entry is not None:
                            raw_messages.append(_unacked_message(entry))
        finally:
            client.close()
    except redis.RedisError as error:
        raise TransientError(f"broker unavailable: {type(error).__name__}") from error
    run_ids = set()
    for raw in raw_messages:
        run_id = _run_id_of(raw)
        if run_id:
            run_ids.add(run_id)
    return run_ids


def _queue_keys(settings: Settings) -> list[str]:
    """The Redis lists of every pipeline's queue (each priority step)."""
    return [f"{queue}{_PRIORITY_SEPARATOR}{step}" if step else queue
            for queue in dict.fromkeys(p.queue for p in settings.pipeline_list)
            for step in _PRIORITY_STEPS]


def _unacked_message(entry: bytes | str) -> Any:
    """kombu stores a reserved message as JSON `[message, exchange, routing_key]`."""
    try:
        return json.loads(entry)[0]
    except (ValueError, IndexError, TypeError, KeyError):
        return None


def _run_id_of(raw: Any) -> str | None:
    """The run id a score message carries (Celery protocol 2, JSON body), or None."""
    try:
        message = json.loads(raw) if isinstance(raw, bytes | str) else raw
        if message.get("headers", {}).get("task") != SCORE_TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return str(args[0]) if args else None

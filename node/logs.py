"""JSON logging through structlog: one event per line, snake_case past-tense event names.

Never log PHI: log UIDs, SOP classes, counts and timings only. Third-party loggers (pynetdicom
dumps whole datasets at DEBUG) are held at WARNING so they cannot leak patient data.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_NOISY_LOGGERS = ("pynetdicom", "celery", "kombu", "amqp", "redis", "monai", "highdicom", "pydicom")


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Route structlog and stdlib logging to one JSON-lines stream (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

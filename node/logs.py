"""JSON logging through structlog: one JSON object per line, whoever writes it.

Our own events are structlog calls: snake_case past-tense names, UIDs, counts, timings. Everything
else that would reach the log stream is routed through the same JSON renderer
(`configure_logging`): stdlib logging records of libraries (pynetdicom, pydicom, celery, ...),
Python warnings (`logging.captureWarnings`), exceptions that kill a thread
(`threading.excepthook`) or the main thread (`sys.excepthook`). A traceback is one structured
field (`exception`: type, message, frames of file/line/function), never raw text and never
local variables.

Never log PHI: log UIDs, SOP classes, counts and timings only. A library's message or an
exception's text may quote a value it choked on (pydicom's "Invalid value for VR PN: '...'"),
so quoted text in those is replaced by `'…'` (`redact_quoted`). Third-party loggers (pynetdicom
dumps whole datasets at DEBUG) are held at WARNING so they cannot leak patient data.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from types import TracebackType
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, WrappedLogger

_NOISY_LOGGERS = ("pynetdicom", "celery", "kombu", "amqp", "redis", "monai", "highdicom", "pydicom")
_QUOTED = re.compile(r"""'[^']*'|"[^"]*"|b'[^']*'""")
REDACTED = "'…'"
MAX_FRAMES = 12

_transform_exception = ExceptionDictTransformer(show_locals=False, max_frames=MAX_FRAMES)


def redact_quoted(text: str) -> str:
    """`text` with every quoted span replaced: what a library quotes is usually the value (pure)."""
    return _QUOTED.sub(REDACTED, text)


def _mark_foreign(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """A record from a library: its message redacted, its logger named."""
    event_dict["event"] = redact_quoted(str(event_dict.get("event", "")))
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger"] = record.name
    return event_dict


def _structured_exception(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """`exc_info` as an `exception` field: a list of {type, message, frames} (causes included),
    messages redacted, no locals."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return event_dict
    stacks = _transform_exception(exc_info)
    event_dict["exception"] = [
        {
            "type": stack.get("exc_type"),
            "message": redact_quoted(str(stack.get("exc_value", "")))[:500],
            "frames": [
                {"file": frame.get("filename"), "line": frame.get("lineno"),
                 "function": frame.get("name")}
                for frame in stack.get("frames", [])
            ],
        }
        for stack in stacks
    ]
    return event_dict


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Route structlog, stdlib logging, warnings and uncaught exceptions to one JSON-lines stream
    (stderr by default)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, _mark_foreign],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _structured_exception,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    get_logger("node.threads").error(
        "thread_crashed", thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_uncaught_exception(exc_type: type[BaseException], exc_value: BaseException,
                            exc_traceback: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc_value, exc_traceback)
        return
    get_logger("node").critical("uncaught_exception",
                                exc_info=(exc_type, exc_value, exc_traceback))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

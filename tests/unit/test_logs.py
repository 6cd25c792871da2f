"""Every log line is one JSON object (node/logs.py): our events, library records, warnings and
the exceptions that kill a thread, with tracebacks as a structured field and quoted values
redacted."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from node.logs import REDACTED, configure_logging, get_logger, redact_quoted


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    hooks = (threading.excepthook, sys.excepthook)
    handlers = logging.getLogger().handlers[:]
    configure_logging("INFO", buffer)
    yield buffer
    threading.excepthook, sys.excepthook = hooks
    logging.getLogger().handlers[:] = handlers
    logging.captureWarnings(False)


def _records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_quoted_values_are_redacted() -> None:
    assert redact_quoted("Invalid value for VR PN: 'Doe^Jane'") == f"Invalid value for VR PN: {REDACTED}"
    assert redact_quoted('name "Doe^Jane" and b\'\\x00\'') == f"name {REDACTED} and {REDACTED}"
    assert redact_quoted("no quotes") == "no quotes"


def test_our_events_and_a_librarys_traceback_are_one_json_object_each(
        stream: io.StringIO) -> None:
    get_logger("node.test").info("thing_done", count=3)
    try:
        raise ValueError("cannot read 'Doe^Jane'")
    except ValueError:
        logging.getLogger("pynetdicom.dul").exception("Exception in DUL.run(), aborting")
    ours, theirs = _records(stream)
    assert ours["event"] == "thing_done" and ours["count"] == 3 and ours["level"] == "info"
    assert theirs["logger"] == "pynetdicom.dul" and theirs["level"] == "error"
    (exception,) = theirs["exception"]
    assert exception["type"] == "ValueError"
    assert "Doe^Jane" not in json.dumps(theirs)
    assert exception["frames"][-1]["function"] == (
        "test_our_events_and_a_librarys_traceback_are_one_json_object_each")
    assert set(exception["frames"][-1]) == {"file", "line", "function"}  # no locals


def test_warnings_and_a_dying_thread_are_json_too(stream: io.StringIO) -> None:
    warnings.warn("Invalid value for VR PN: 'Doe^Jane'", UserWarning, stacklevel=1)

    def crash() -> None:
        raise RuntimeError("boom")

    thread = threading.Thread(target=crash, name="doomed")
    thread.start()
    thread.join()
    warning, crashed = _records(stream)
    assert warning["logger"] == "py.warnings" and "Doe^Jane" not in warning["event"]
    assert crashed["event"] == "thread_crashed" and crashed["thread"] == "doomed"
    assert crashed["exception"][0]["type"] == "RuntimeError"
    assert "\n" not in stream.getvalue().rstrip("\n").split("\n")[0]

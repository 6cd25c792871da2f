"""Shared fixtures: real Redis and Orthanc on free loopback ports (see tools/stack/services.py).

Binaries (redis-server, Orthanc, dcmtk, dciodvfy) are installed by `make test`
(tools/install.sh), so a missing one fails the test with a clear message instead of skipping.
Mark a test that calls them directly with ``@pytest.mark.requires_bin("storescu", ...)``, or
ask for the ``echoscu``/``storescu``/``storescp``/``dciodvfy`` fixtures, which return the path.

Every service a test starts through tools/stack/services.py is stopped when the test ends, pass or
fail. A module- or session-scoped fixture that owns a service sets ``service.persist = True``
so the per-test safety net leaves it running; all services stop at session end regardless.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tools.stack import services

INSTALL_HINT = "install the Debian packages with `make install` (tools/install.sh)"

# binary -> Debian package that ships it
BINARY_PACKAGES = {
    "redis-server": "redis-server",
    "Orthanc": "orthanc",
    "echoscu": "dcmtk",
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "dcmdump": "dcmtk",
    "dciodvfy": "dicom3tools",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_bin(*names): the test runs these binaries; missing ones fail the test",
    )


# The fault suite shares one stack per package and measures the node's memory and recovery
# under a known load: under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) all of it
# goes to one worker, in order, while the other worker takes the independent tests. Each
# integration module stays whole on one worker too: its module-scoped stack is started once and
# its tests keep their order (several build on what the previous one sent).
SERIAL_GROUP = "faults"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    faults_dir, integration_dir = tests_dir / "faults", tests_dir / "integration"
    for item in items:
        if faults_dir in item.path.parents:
            item.add_marker(pytest.mark.xdist_group(SERIAL_GROUP))
        elif integration_dir in item.path.parents:
            item.add_marker(pytest.mark.xdist_group(f"integration-{item.path.stem}"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker, refuse to run if the groups above did not reach the scheduler (a
    pytest/xdist pairing that drops them would silently split the fault suite)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    grouped = [item for item in session.items if item.get_closest_marker("xdist_group")]
    if grouped and not all("@" in item.nodeid for item in grouped):
        raise pytest.UsageError("pytest-xdist did not apply the xdist_group marks: "
                                "check the pytest pin in pyproject.toml")


def require_binary(name: str) -> str:
    """Path of ``name`` (PATH or /usr/sbin); fails the test when it is not installed."""
    try:
        return services.find_binary(name)
    except services.ServiceError:
        pass
    package = BINARY_PACKAGES.get(name, "?")
    pytest.fail(
        f"required binary {name!r} (Debian package {package!r}) is not installed: {INSTALL_HINT}",
        pytrace=False,
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("requires_bin"):
        for name in marker.args:
            require_binary(name)


@pytest.fixture(autouse=True)
def _stop_leaked_services() -> Iterator[None]:
    """Safety net: stop services this test started and left running, even on failure."""
    before = {id(svc) for svc in services.running_services()}
    yield
    for svc in reversed(services.running_services()):
        if id(svc) not in before and not svc.persist:
            svc.stop()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put the process's logging back as it was after each test.

    Code under test (`mammo-node` commands, a worker loading its model) calls
    `node.logs.configure_logging`, which binds the root handler to the `sys.stderr` of that
    moment (a capture that pytest closes when the test ends) and replaces the exception hooks;
    a later test's background thread would then log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    thread_hook, sys_hook = threading.excepthook, sys.excepthook
    structlog_config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    threading.excepthook, sys.excepthook = thread_hook, sys_hook
    structlog.configure(**structlog_config)
    logging.captureWarnings(False)


@pytest.fixture(scope="session", autouse=True)
def _stop_all_services_at_exit() -> Iterator[None]:
    yield
    services.stop_all()


@pytest.fixture
def echoscu() -> str:
    return require_binary("echoscu")


@pytest.fixture
def storescu() -> str:
    return require_binary("storescu")


@pytest.fixture
def storescp() -> str:
    return require_binary("storescp")


@pytest.fixture
def dciodvfy() -> str:
    return require_binary("dciodvfy")


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., services.RedisService]]:
    """``make(**kwargs)`` -> a started RedisService (own dir, password); all stopped after."""
    require_binary("redis-server")
    started: list[services.RedisService] = []

    def make(**kwargs: Any) -> services.RedisService:
        service = services.RedisService(tmp_path / f"redis{len(started)}", **kwargs)
        started.append(service)
        return service.start()

    yield make
    for service in reversed(started):
        service.stop()


@pytest.fixture
def redis_service(redis_factory: Callable[..., services.RedisService]) -> services.RedisService:
    """A private redis-server on 127.0.0.1 with a password (``.url`` is the broker URL)."""
    return redis_factory()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., services.OrthancService]]:
    """``make(ae_title="ORTHANC", modalities={name: [AET, host, port]}, **kwargs)``.

    Returns a started OrthancService in its own folder under tmp_path; all are stopped after.
    """
    require_binary("Orthanc")
    started: list[services.OrthancService] = []

    def make(
        ae_title: str = "ORTHANC",
        modalities: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> services.OrthancService:
        service = services.OrthancService(
            tmp_path / f"orthanc{len(started)}",
            ae_title=ae_title,
            modalities=modalities,
            **kwargs,
        )
        started.append(service)
        return service.start()

    yield make
    for service in reversed(started):
        service.stop()

"""The pynetdicom internals module refuses a pynetdicom it was not written for, and names its
contract; the listener checks before it binds."""

from __future__ import annotations

from pathlib import Path

import pynetdicom
import pytest

from node import pynetdicom_internals
from node.completion import AssociationTracker
from node.pynetdicom_internals import (
    CONTRACT_FAULT_TESTS,
    WRITTEN_FOR,
    PynetdicomVersionError,
    check_pynetdicom_version,
)
from node.scp import StoreSCP
from node.spool import Spool
from tests.support.settings import make_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_pynetdicom_is_the_one_it_was_written_for() -> None:
    assert pynetdicom.__version__ == WRITTEN_FOR == "3.0.4"
    check_pynetdicom_version()


def test_another_version_fails_loudly_naming_versions_and_fault_tests() -> None:
    with pytest.raises(PynetdicomVersionError) as raised:
        check_pynetdicom_version("3.1.0")
    message = str(raised.value)
    assert "3.1.0" in message and WRITTEN_FOR in message
    assert all(test in message for test in CONTRACT_FAULT_TESTS)


def test_the_contract_fault_tests_exist_and_are_in_the_docstring() -> None:
    assert CONTRACT_FAULT_TESTS
    for test in CONTRACT_FAULT_TESTS:
        assert (ROOT / test).is_file(), test
        assert test in (pynetdicom_internals.__doc__ or "")


def test_the_listener_does_not_start_on_another_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, listener=True)
    scp = StoreSCP(settings, Spool(settings.spool.dir).ensure(), AssociationTracker())
    monkeypatch.setattr(pynetdicom_internals.check_pynetdicom_version, "__defaults__", ("9.9.9",))
    with pytest.raises(PynetdicomVersionError, match="9.9.9"):
        scp.start()
    assert scp._server is None  # nothing was bound

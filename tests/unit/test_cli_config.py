"""`config check` and `serve` load the TLS files up front: a bad file is exit 2 naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import cli
from tests.support.settings import write_config


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_missing_listener_certificate_is_a_config_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    tls = {"cert_file": "missing-cert.pem", "key_file": "missing-key.pem"}
    path = write_config(tmp_path / "node.yaml", node={"port": 1, "tls": tls})
    argv = ["config", "check", str(path)] if command == "check" else ["serve", "--config", str(path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "node.tls.cert_file/key_file: cannot load" in err
    assert "missing-cert.pem" in err


def test_a_destination_ca_that_does_not_load_is_named_by_its_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad-ca.pem").write_text("not a certificate\n")
    destination = {"name": "archive", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242,
                   "tls": {"ca_file": "bad-ca.pem"}}
    path = write_config(tmp_path / "node.yaml", destinations=[destination])
    assert cli.main(["config", "check", str(path)]) == 2
    assert "destinations[0].tls.ca_file: cannot load" in capsys.readouterr().err


def test_a_config_without_tls_still_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check", str(write_config(tmp_path / "node.yaml"))]) == 0
    assert ": ok (ae_title MAMMO_NODE" in capsys.readouterr().out

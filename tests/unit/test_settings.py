"""The config contract: the example loads, every error names the key and the bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from node.errors import ConfigError
from node.settings import load_settings, parse_settings
from tools.stack.node_stack import merge_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "node.example.yaml"


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_config_loads_with_paths_relative_to_the_file() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.node.ae_title == "MAMMO_NODE"
    assert settings.spool.dir == (ROOT / "var" / "spool").resolve()
    assert settings.model.bundle_dir == (ROOT / "models" / "mias-baseline").resolve()
    assert [d.name for d in settings.destinations] == ["pacs"]
    assert settings.outputs.sr.series_number != settings.outputs.seg.series_number


def test_settings_are_frozen() -> None:
    settings = load_settings(EXAMPLE)
    with pytest.raises(ValidationError):
        settings.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, "node.ae_title"),
        ({"node": {"bind_address": "not-an-ip"}}, "node.bind_address"),
        ({"node": {"colour": "blue"}}, "node.colour"),
        ({"broker": {"url": "redis://:secret@127.0.0.1:6379/0"}}, "broker.url"),
        ({"outputs": {"uid_root": "1.2.3"}}, "outputs.uid_root"),
        ({"completion": {"quiet_period_s": 60, "deadline_s": 10}}, "completion"),
        ({"allowed_callers": []}, "allowed_callers"),
    ],
)
def test_bad_values_name_the_key(patch: dict, expected: str) -> None:
    data = merge_config(_example(), patch)
    with pytest.raises(ConfigError) as error:
        parse_settings(data, "node.yaml")
    assert f"node.yaml: {expected}" in str(error.value)


def test_secret_never_echoed_back() -> None:
    data = _example()
    data["broker"]["url"] = "redis://:hunter2@127.0.0.1:6379/0"
    with pytest.raises(ConfigError) as error:
        parse_settings(data)
    assert "broker.url" in str(error.value)


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(EXAMPLE)
    monkeypatch.setenv("MAMMO_BROKER_PASSWORD", "p@ss/word")
    assert settings.broker.url_with_password() == "redis://:p%40ss%2Fword@127.0.0.1:6379/0"
    monkeypatch.delenv("MAMMO_BROKER_PASSWORD")
    assert settings.broker.url_with_password() == "redis://127.0.0.1:6379/0"


def _config_check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAMMO_BROKER_PASSWORD": "set-for-the-check"}
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, check=False, env=env)


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    assert _config_check(EXAMPLE).returncode == 0
    data = _example()
    data["node"]["port"] = "eleven"
    data["destinations"][0]["port"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = _config_check(bad)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("node.port" in line and "'eleven'" in line for line in lines)
    assert any("destinations.0.port" in line and "0" in line for line in lines)
    missing = _config_check(tmp_path / "absent.yaml")
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_derived_uids_are_deterministic_and_valid() -> None:
    from node.uids import derive_uid, is_valid_uid

    for root in (None, "1.2.826.0.1.3680043.10.999."):
        first = derive_uid(root, "sr", "1.2.3", "model", "1.0")
        assert first == derive_uid(root, "sr", "1.2.3", "model", "1.0")
        assert first != derive_uid(root, "sr", "1.2.3", "model", "1.1")
        assert is_valid_uid(first)

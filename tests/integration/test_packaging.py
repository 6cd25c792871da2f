"""The Dockerfile and docker-compose.yml: linted offline, and consistent with the CLI and configs.

No Docker engine runs here; hadolint and check-jsonschema (the Compose specification) do.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_DIR = ROOT / "config" / "compose"
NODE_YAML = COMPOSE_DIR / "node.yaml"
ORTHANC_JSON = COMPOSE_DIR / "orthanc" / "orthanc.json"
CONFIG_IN_IMAGE = "/etc/mammo-node/node.yaml"
SPOOL_IN_IMAGE = "/var/lib/mammo-node/spool"


def venv_tool(name: str) -> str:
    """A dev tool installed beside the running Python (the .venv: `make install`)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {path.parent}: run `make install`", pytrace=False)
    return str(path)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [rest for keyword, rest in dockerfile_instructions() if keyword == name]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def node_config() -> dict[str, Any]:
    return yaml.safe_load(NODE_YAML.read_text())


@pytest.fixture(scope="module")
def orthanc_config() -> dict[str, Any]:
    return json.loads(ORTHANC_JSON.read_text())


def test_hadolint_passes_the_dockerfile() -> None:
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_the_cli_as_a_non_root_user() -> None:
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["mammo-node"]
    assert json.loads(instruction("CMD")[-1]) == ["serve", "--config", CONFIG_IN_IMAGE]
    user = instruction("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(instruction("VOLUME")[-1]) == [SPOOL_IN_IMAGE]
    assert instruction("EXPOSE") == ["11112"]
    assert any("echoscu" in rest for rest in instruction("HEALTHCHECK"))
    # torch is pinned and installed from a chosen index before the project
    runs = instruction("RUN")
    torch_step = next(i for i, rest in enumerate(runs) if '"torch==${TORCH_VERSION}"' in rest)
    project_step = next(i for i, rest in enumerate(runs) if "pip install" in rest and " ." in rest)
    assert torch_step < project_step
    assert "--index-url" in runs[torch_step] and "--constraint" in runs[project_step]


def test_compose_topology_is_the_demo_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"orthanc", "redis", "node", "worker"}
    for name in ("node", "worker"):
        service = services[name]
        assert service["build"]["context"] == "."
        assert f"./config/compose/node.yaml:{CONFIG_IN_IMAGE}:ro" in service["volumes"]
        assert f"spool:{SPOOL_IN_IMAGE}" in service["volumes"]
        assert "MAMMO_BROKER_PASSWORD" in service["environment"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service.get("deploy", {}).get("replicas", 1) == 1
    assert services["node"]["command"] == ["serve", "--config", CONFIG_IN_IMAGE]
    assert services["worker"]["command"] == ["worker", "--config", CONFIG_IN_IMAGE]
    assert services["node"]["image"] == services["worker"]["image"]

    # Orthanc's web/REST port only on this host's loopback; nothing else published
    assert services["orthanc"]["ports"] == ["127.0.0.1:8042:8042"]
    assert all("ports" not in services[name] for name in ("redis", "node", "worker"))

    redis_command = " ".join(services["redis"]["command"])
    assert "--requirepass" in redis_command and "--appendonly yes" in redis_command
    assert services["redis"]["image"].startswith("redis:7")
    password = services["node"]["environment"]["MAMMO_BROKER_PASSWORD"]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == password
    assert password.startswith("${MAMMO_BROKER_PASSWORD")


def test_compose_configs_agree(
    compose: dict[str, Any], node_config: dict[str, Any], orthanc_config: dict[str, Any]
) -> None:
    node = node_config["node"]
    (pacs,) = node_config["destinations"]
    callers = {(c["ae_title"], c.get("host")) for c in node_config["allowed_callers"]}

    # Orthanc knows the node as MAMMO_NODE -> node:<port>, and takes stores from known AEs only
    assert orthanc_config["DicomModalities"]["MAMMO_NODE"] == [
        node["ae_title"],
        "node",
        node["port"],
    ]
    assert orthanc_config["DicomAlwaysAllowStore"] is False
    assert orthanc_config["MaximumPduLength"] == 131072
    assert orthanc_config["AuthenticationEnabled"] is False  # acceptable: 8042 is loopback-only
    # the node sends results to Orthanc and accepts Orthanc's pushes
    assert (pacs["ae_title"], pacs["host"], pacs["port"]) == (
        orthanc_config["DicomAet"],
        "orthanc",
        orthanc_config["DicomPort"],
    )
    assert (orthanc_config["DicomAet"], None) in callers
    # the image's health check calls in as MAMMO_HEALTHCHECK_AET from loopback
    env = " ".join(instruction("ENV"))
    healthcheck_aet = re.search(r"MAMMO_HEALTHCHECK_AET=(\S+)", env).group(1)
    assert re.search(r"MAMMO_NODE_AET=(\S+)", env).group(1) == node["ae_title"]
    assert (healthcheck_aet, "127.0.0.1") in callers
    assert node["bind_address"] == "0.0.0.0" and node["port"] == 11112
    # shared spool, broker on the compose network, password from the environment
    assert node_config["spool"]["dir"] == SPOOL_IN_IMAGE
    assert node_config["broker"]["url"].startswith("redis://redis:6379/")
    assert node_config["broker"]["password_env"] == "MAMMO_BROKER_PASSWORD"
    assert node_config["model"]["bundle_dir"].startswith("/opt/mammo-node/models/")
    assert instruction("WORKDIR")[-1] == "/opt/mammo-node"


def test_compose_commands_are_cli_commands(compose: dict[str, Any]) -> None:
    if not (ROOT / "node" / "cli.py").exists():
        pytest.skip("node/cli.py not written yet")
    from node import cli

    parser = cli.build_parser()
    node = parser.parse_args(compose["services"]["node"]["command"])
    worker = parser.parse_args(compose["services"]["worker"]["command"])
    assert node.func is cli.cmd_serve and node.config == CONFIG_IN_IMAGE
    assert worker.func is cli.cmd_worker and worker.config == CONFIG_IN_IMAGE


def test_compose_node_config_passes_config_check() -> None:
    if not (ROOT / "node" / "cli.py").exists():
        pytest.skip("node/cli.py not written yet")
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "config", "check", "--schema-only", str(NODE_YAML)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

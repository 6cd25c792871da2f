"""The README's "Running it" block runs as written, in a copy of the checkout.

Each line of the fenced block is run in order in a temporary folder laid out like the checkout
(the example config copied, `models/` and `.venv` linked): activate, copy the example, export
the password, then every `mammo-node` command. The one edit a user makes after copying is made
too (free ports instead of 11112 and 4242, so the test collides with nothing). `serve` is run
until its port answers and then stopped with SIGTERM; `worker` needs Redis and is covered by the
end-to-end tests, so here it is only parsed. Placeholders (RUN_ID, DAYS) and optional parts in
brackets are filled or dropped.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from node import cli
from tools.stack.services import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def running_it_commands() -> list[list[str]]:
    """The commands of the first ```sh block under "## Running it", as argument lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Running it\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s\[[^\]]*\]", "", line)  # optional parts: [--state failed]
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def _wait_for_port(port: int, process: subprocess.Popen[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"serve never listened on {port}")


def test_every_command_of_running_it_runs_as_written(tmp_path: Path) -> None:
    commands = running_it_commands()
    assert commands[0][:2] == [".", ".venv/bin/activate"] and (ROOT / ".venv/bin/activate").is_file()
    (tmp_path / "config").mkdir()
    example = (ROOT / "config" / "node.example.yaml").read_text()
    (tmp_path / "config" / "node.example.yaml").write_text(example)
    (tmp_path / "models").symlink_to(ROOT / "models")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if k != "MAMMO_BROKER_PASSWORD"}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    node_port = free_port()
    ran = []
    for words in commands[1:]:
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
            continue
        words = [{"RUN_ID": "20250101T000000-000000000000-000000", "DAYS": "1"}.get(w, w)
                 for w in words]
        if words[0] == "cp":
            subprocess.run(words, cwd=tmp_path, check=True)
            config = tmp_path / words[-1]
            data = yaml.safe_load(config.read_text())
            data["node"]["port"] = node_port
            data["destinations"][0]["port"] = free_port()  # nobody there: echo answers 1
            config.write_text(yaml.safe_dump(data, sort_keys=False))
            continue
        assert words[0] == "mammo-node", words
        args = cli.build_parser().parse_args(words[1:]) if words[1:] != ["--version"] else None
        if args is not None and args.func is cli.cmd_worker:
            ran.append("worker (parsed only)")
            continue
        if args is not None and args.func is cli.cmd_serve:
            serve = subprocess.Popen(words, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
            try:
                _wait_for_port(node_port, serve)
            finally:
                serve.send_signal(signal.SIGTERM)
                assert serve.wait(60) == 0
            ran.append("serve")
            continue
        result = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120, check=False)
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output[-3000:]
        # echo, selftest and status reach for peers that are not running here (a PACS, the
        # listener, Redis, workers): they answer "failed", 1; retry/discard name no real run
        expected = 1 if words[1] in ("echo", "selftest", "status") or words[1:3] in (
            ["runs", "retry"], ["runs", "discard"]) else 0
        assert result.returncode == expected, (words, output[-3000:])
        ran.append(" ".join(words[1:3]))
    assert {"--version", "config check", "serve", "runs list", "runs purge"} <= set(ran), ran

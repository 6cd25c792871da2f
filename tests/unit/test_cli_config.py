"""`config check` says whether the node could start here, offline, one line per problem naming the
key, exit 2, and never a secret; `serve` loads the TLS files up front; `--version`; `runs list`
on a missing spool."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from node import cli
from tests.support.logging_state import logging_restored
from tests.support.settings import write_config

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "mias-baseline"
CANARY = "Canary-pw-7Q2x"  # a password that must never come back in any output


@pytest.fixture(autouse=True)
def _broker_password(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Set for every test; and `main()` configures logging for the process: put it back after."""
    monkeypatch.setenv("MAMMO_BROKER_PASSWORD", CANARY)
    with logging_restored():
        yield


def _runnable(path: Path, **overrides: Any) -> Path:
    """A config that passes every offline check on this machine (the shipped bundle)."""
    return write_config(path, **{"model": {"bundle_dir": str(BUNDLE)}, **overrides})


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = cli.main(["config", "check", str(path)])
    captured = capsys.readouterr()
    assert CANARY not in captured.out + captured.err
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_missing_listener_certificate_is_a_config_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    tls = {"cert_file": "missing-cert.pem", "key_file": "missing-key.pem"}
    path = _runnable(tmp_path / "node.yaml", node={"port": 1, "tls": tls})
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
    path = _runnable(tmp_path / "node.yaml", destinations=[destination])
    code, lines, _ = _check(path, capsys)
    assert code == 2
    assert [line for line in lines if "destinations[0].tls.ca_file: cannot load" in line]


def test_a_runnable_config_checks_ok_without_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _runnable(tmp_path / "node.yaml")
    code, lines, out = _check(path, capsys)
    assert (code, lines) == (0, [])
    assert ": ok (ae_title MAMMO_NODE" in out
    assert not (tmp_path / "spool").exists(), "the check must not create the spool"


def test_an_unset_password_variable_is_named_not_its_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAMMO_BROKER_PASSWORD")
    monkeypatch.setenv("OTHER_PASSWORD", CANARY)
    path = _runnable(tmp_path / "node.yaml")
    code, lines, _ = _check(path, capsys)
    assert code == 2
    assert lines == [f"{path}: broker.password_env: the environment variable MAMMO_BROKER_PASSWORD "
                     "is not set (the broker password)"]


def test_a_missing_or_tampered_bundle_is_found_without_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = _runnable(tmp_path / "a" / "node.yaml", model={"bundle_dir": "../no-such-bundle"})
    code, lines, _ = _check(missing, capsys)
    assert code == 2
    # relative to the config file, not to the working directory
    assert lines == [f"{missing}: model.bundle_dir: model bundle {tmp_path / 'no-such-bundle'}: "
                     "folder not found"]

    tampered = tmp_path / "bundle"
    shutil.copytree(BUNDLE, tampered)
    with (tampered / "model.ts").open("ab") as handle:
        handle.write(b"\0")
    path = _runnable(tmp_path / "b" / "node.yaml", model={"bundle_dir": str(tampered)})
    code, lines, _ = _check(path, capsys)
    assert code == 2 and len(lines) == 1
    assert "model.bundle_dir:" in lines[0] and "does not match metadata.json" in lines[0]

    (tampered / "metadata.json").write_text("{ not json")
    code, lines, _ = _check(path, capsys)
    assert code == 2 and len(lines) == 1
    assert "model.bundle_dir:" in lines[0] and "metadata.json: not valid JSON" in lines[0]

    # the worker's own check runs in a process that never imported torch for this
    code_path = "import sys, node.config_check; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code_path], cwd=ROOT, check=False).returncode == 0


def test_a_spool_that_cannot_be_created_or_written_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    under_a_file = _runnable(tmp_path / "node.yaml", spool={"dir": "a-file/spool"})
    code, lines, _ = _check(under_a_file, capsys)
    assert code == 2
    # the audit trail defaults to <spool>/audit.jsonl: both keys are named
    assert {line.split(": ")[1] for line in lines} == {"spool.dir", "audit.path"}
    assert all(f"cannot be created: {tmp_path / 'a-file'} is not a folder" in line for line in lines)

    is_a_file = _runnable(tmp_path / "node2.yaml", spool={"dir": "a-file"},
                          audit={"path": str(tmp_path / "audit.jsonl")})
    code, lines, _ = _check(is_a_file, capsys)
    assert code == 2
    assert lines == [f"{is_a_file}: spool.dir: {tmp_path / 'a-file'} exists and is not a folder"]


def test_every_problem_is_one_line_and_no_secret_is_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps({
        "allowed_callers": [{"ae_title": "STORESCU"}],
        "spool": {"dir": "spool"},
        "broker": {"url": f"redis://admin:{CANARY}@127.0.0.1:6379/0", "password": CANARY},
        "node": {"port": "eleven"},
    }))
    code, lines, _ = _check(path, capsys)
    assert code == 2
    assert len(lines) == 3
    assert [line for line in lines if "broker.url" in line and "***@127.0.0.1" in line]
    assert [line for line in lines if "broker.password" in line]
    assert [line for line in lines if "node.port" in line]

    path.write_text(f"broker:\n  url: redis://:{CANARY}@127.0.0.1:6379/0\n    bad: [indent\n")
    code, lines, _ = _check(path, capsys)
    assert code == 2 and "not valid YAML" in lines[0]


def test_schema_only_skips_the_machine_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAMMO_BROKER_PASSWORD")
    path = write_config(tmp_path / "node.yaml", model={"bundle_dir": "/opt/elsewhere"})
    assert cli.main(["config", "check", "--schema-only", str(path)]) == 0
    assert cli.main(["config", "check", str(path)]) == 2
    capsys.readouterr()


def test_version_is_the_installed_distribution_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.attribution import software_version

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    installed = metadata.version("mammo-node")
    assert capsys.readouterr().out.strip() == f"mammo-node {installed}"
    assert software_version() == installed


def test_runs_list_on_a_missing_spool_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "node.yaml")
    assert cli.main(["runs", "list", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"spool {tmp_path / 'spool'} not found" in captured.err
    (tmp_path / "spool").mkdir()
    assert cli.main(["runs", "list", "--config", str(path)]) == 0


def test_selftest_usage_problems_are_exit_2_and_a_dead_listener_is_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    path = write_config(tmp_path / "node.yaml", listener=True, destinations=[destination])
    assert cli.main(["selftest", "--config", str(path), "--destination", "archive"]) == 2
    assert "unknown destination(s) archive (configured: pacs)" in capsys.readouterr().err

    assert cli.main(["selftest", "--config", str(path), "--calling-ae", "ELSEWHERE"]) == 2
    assert "--calling-ae ELSEWHERE: not an allowed caller from 127.0.0.1" in capsys.readouterr().err

    remote_only = write_config(tmp_path / "remote.yaml", listener=True, destinations=[destination],
                               allowed_callers=[{"ae_title": "PACS", "host": "10.1.2.3"}])
    assert cli.main(["selftest", "--config", str(remote_only)]) == 2
    assert "no allowed caller is admitted from 127.0.0.1" in capsys.readouterr().err

    # nobody listens on the configured port: the self-test fails, it does not hang
    assert cli.main(["selftest", "--config", str(path), "--timeout-s", "5"]) == 1
    out = capsys.readouterr().out
    assert "image(s) not stored (no answer" in out and out.strip().endswith("selftest: FAILED")


def test_the_monitoring_token_variable_and_certificate_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monitoring = {"token_env": "MAMMO_METRICS_TOKEN",
                  "tls": {"cert_file": "no-cert.pem", "key_file": "no-key.pem"}}
    path = _runnable(tmp_path / "node.yaml", monitoring=monitoring)
    code, lines, _ = _check(path, capsys)
    assert code == 2
    assert [line.split(": ")[1] for line in lines] == ["monitoring.token_env",
                                                       "monitoring.tls.cert_file/key_file"]


def test_skipping_outside_the_domain_needs_a_bundle_that_declares_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`scoring.outside_domain: skip` with the shipped bundle checks OK; with a bundle whose
    metadata declares no domain it is a problem naming the key (nothing would be skipped)."""
    skip = {"scoring": {"outside_domain": "skip"}}
    code, lines, _ = _check(_runnable(tmp_path / "a" / "node.yaml", **skip), capsys)
    assert code == 0 and lines == []
    bare = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bare)
    meta = json.loads((bare / "metadata.json").read_text())
    del meta["domain"]
    (bare / "metadata.json").write_text(json.dumps(meta))
    path = _runnable(tmp_path / "b" / "node.yaml", model={"bundle_dir": str(bare)}, **skip)
    code, lines, _ = _check(path, capsys)
    assert code == 2
    assert lines == [f"{path}: model.bundle_dir: outside_domain is skip, but the bundle's "
                     "metadata.json declares no domain: every image would be scored"]
    code, lines, _ = _check(_runnable(tmp_path / "c" / "node.yaml",
                                      model={"bundle_dir": str(bare)}), capsys)
    assert code == 0 and lines == []  # scoring.outside_domain: score, the default


def test_the_operating_point_must_be_one_the_bundle_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`model.operating_point` names one of the bundle's operating points (the shipped one has
    balanced, high_sensitivity and exam_specificity_90); another name is a problem naming the
    key and the points."""
    code, lines, _ = _check(_runnable(tmp_path / "a" / "node.yaml",
                                      model={"bundle_dir": str(BUNDLE),
                                             "operating_point": "high_sensitivity"}), capsys)
    assert code == 0 and lines == []
    path = _runnable(tmp_path / "b" / "node.yaml",
                     model={"bundle_dir": str(BUNDLE), "operating_point": "strict"})
    code, lines, _ = _check(path, capsys)
    assert code == 2
    assert lines == [f"{path}: model.operating_point: 'strict' is not one of the bundle's "
                     "operating points (balanced, exam_specificity_90, high_sensitivity)"]


@pytest.mark.parametrize("point", ["balanced", "exam_specificity_90"])
def test_an_ok_check_says_what_the_operating_point_flagged_in_the_bundles_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], point: str
) -> None:
    """The recall rate the site's choice of point should give, from the bundle's per-exam table
    (the figure the workers export for the recall-rate alerts)."""
    bundle = json.loads((BUNDLE / "metadata.json").read_text())
    exams = bundle["metrics"]["subgroups"]["exams"]
    normal = exams["specificity"][point]
    flagged = normal["of"] - normal["count"]
    path = _runnable(tmp_path / "node.yaml", model={"bundle_dir": str(BUNDLE),
                                                    "operating_point": point})
    code, lines, out = _check(path, capsys)
    assert (code, lines) == (0, [])
    [note] = [line for line in out.splitlines() if "operating point" in line]
    assert note == (f"{path}: model: {bundle['name']} {bundle['version']} at its {point} operating "
                    f"point ({bundle['operating_points'][point]:.3f}) flagged {flagged} of "
                    f"{normal['of']} normal women's exams ({flagged / normal['of']:.1%}, "
                    f"{exams['images_per_woman']:g} images each) in its cross-validation: about "
                    "the recall rate to expect of a screening population")


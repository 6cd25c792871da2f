"""`mammo-node selftest` against a running node (Redis, Orthanc as the PACS, serve, a worker):
exit 0 when the synthetic study's results reached the PACS, 1 once the PACS is down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from node.selftest import SELFTEST_PATIENT_ID, SELFTEST_PATIENT_NAME
from tools.stack.node_stack import ROOT, NodeStack

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.requires_bin("Orthanc", "redis-server", "echoscu")]


def _selftest(stack: NodeStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "selftest",
         "--config", str(stack.config_path), *args],
        cwd=ROOT, env=stack.env(), capture_output=True, text=True, timeout=400, check=False)


def test_selftest_passes_through_the_real_path_and_fails_when_the_pacs_is_down(tmp_path: Path) -> None:
    with NodeStack(tmp_path / "stack", send_attempts=2) as stack:
        result = _selftest(stack, "--destination", "pacs", "--timeout-s", "240")
        assert result.returncode == 0, result.stdout + result.stderr + stack.log_tail("worker")
        assert result.stdout.strip().endswith("selftest: ok")
        stored = re.search(r"pacs: (\d+)/(\d+) result object\(s\) stored", result.stdout)
        assert stored and stored.group(1) == stored.group(2) and int(stored.group(1)) >= 1
        study_uid = re.search(r"study (\S+)", result.stdout).group(1)  # type: ignore[union-attr]

        # what reached the PACS is the self-test's study, marked so a PACS can filter it
        [record] = [r for r in stack.records("done") if r["study_uid"] == study_uid]
        assert {s["destination"] for s in record["sends"]} == {"pacs"}
        in_pacs = stack.orthanc.find_instances(study_uid=study_uid)
        assert len(in_pacs) == int(stored.group(1)) == len({s["sop_uid"] for s in record["sends"]})
        for instance in in_pacs:
            tags = stack.orthanc.instance_tags(instance)
            assert (tags["PatientName"], tags["PatientID"]) == (SELFTEST_PATIENT_NAME,
                                                                SELFTEST_PATIENT_ID)

        stack.orthanc.stop()
        down = _selftest(stack, "--timeout-s", "240")
        assert down.returncode == 1, down.stdout + down.stderr
        assert re.search(r"pacs: 0/\d+ result object\(s\) stored", down.stdout), down.stdout
        assert down.stdout.strip().endswith("selftest: FAILED")

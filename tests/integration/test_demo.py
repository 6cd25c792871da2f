"""`make demo` is the first thing a user runs: it must work, print the scores, and clean up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.requires_bin("storescu", "Orthanc", "redis-server")]


def test_demo_prints_scores_and_result_ids_and_stops_what_it_started(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "tools.demo", "--dir", str(work)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for level in ("view     R-CC", "view     L-MLO", "breast   R", "breast   L", "exam"):
        assert level in out
    assert out.count("SEG: ") == 4 and out.count("SR : ") == 1
    assert "Stopping what the demo started" in out
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "processes of the demo still running"

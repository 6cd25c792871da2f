"""STYLE.md's promise, kept by the suite: ruff and mypy clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout[-4000:]


def test_mypy_is_clean() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout[-4000:]


def test_node_never_imports_pipelines_torch_or_monai() -> None:
    """The receiver must run without the scoring stack."""
    code = ("import sys, node.cli, node.service, node.scp, node.scu, node.spool, node.queueing; "
            "bad = [m for m in ('pipelines', 'torch', 'monai') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, f"node imported: {result.stdout.strip()} {result.stderr[-500:]}"

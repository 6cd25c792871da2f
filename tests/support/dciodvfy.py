"""dicom3tools' dciodvfy as the judge of every object we write."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

from pydicom import Dataset

from tools.stack.services import find_binary


def run_dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file."""
    result = subprocess.run([find_binary("dciodvfy"), str(path)], capture_output=True, text=True,
                            check=False, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def to_bytes(dataset: Dataset) -> bytes:
    """A dataset as the Part 10 bytes a peer would receive."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_dciodvfy_clean(data: bytes, path: Path, allowed_warnings: set[str]) -> None:
    """No error, and no warning but the listed ones (each listed with its reason by the caller)."""
    path.write_bytes(data)
    errors, warnings = run_dciodvfy(path)
    assert errors == []
    assert [w for w in warnings if w not in allowed_warnings] == []

"""dicom3tools' dciodvfy as the judge of every object we write."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.stack import find_binary


def run_dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file."""
    result = subprocess.run([find_binary("dciodvfy"), str(path)], capture_output=True, text=True,
                            check=False, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings

"""pixelmed's validators: the second judge, beside dciodvfy, of every DICOM object the node writes.

`DicomSRValidator` checks an SR's IOD and its templates (TID 1500, TID 4000);
`DicomInstanceValidator` checks any other IOD (SEG, Secondary Capture, Parametric Map).
The Debian package `pixelmed-apps` ships them (installed by tools/install.sh); Java 17 needs its
XPath limits lifted for pixelmed's XML rules.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# One short run per object: the quick compiler only and one GC thread take a third less CPU
# than the JVM's defaults for the same report (the suite runs beside other tests), same output.
JAVA_OPTIONS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                "-Djdk.xml.xpathTotalOpLimit=0", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
SR_VALIDATOR = "com.pixelmed.validate.DicomSRValidator"
INSTANCE_VALIDATOR = "com.pixelmed.validate.DicomInstanceValidator"


@dataclass(frozen=True)
class PixelmedReport:
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


def validator_for(dataset: Dataset) -> str:
    return SR_VALIDATOR if dataset.get("Modality") == "SR" else INSTANCE_VALIDATOR


def pixelmed_report(dataset_or_path: Dataset | Path, validator: str | None = None) -> PixelmedReport:
    """Run pixelmed on a file (or a dataset, written to a temporary file first)."""
    with tempfile.TemporaryDirectory() as scratch:
        if isinstance(dataset_or_path, Dataset):
            path = Path(scratch) / "object.dcm"
            dataset_or_path.save_as(path, enforce_file_format=True)
            validator = validator or validator_for(dataset_or_path)
        else:
            path = dataset_or_path
            if validator is None:
                from pydicom import dcmread

                validator = validator_for(dcmread(path, stop_before_pixels=True))
        result = subprocess.run(
            ["java", *JAVA_OPTIONS, "-cp", str(PIXELMED_JAR), validator, str(path)],
            capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    lines = [line.strip() for line in output.splitlines()]
    errors = [line for line in lines if line.startswith("Error")]
    # Not recognising the IOD means nothing was checked: that is a failure, not a pass.
    errors += [line for line in lines if "unrecognized" in line.lower() and "IOD" in line]
    warnings = [line for line in lines if line.startswith("Warning")]
    if result.returncode not in (0, 1) and not errors:
        errors.append(f"pixelmed exited with {result.returncode}: {output[-500:]}")
    return PixelmedReport(tuple(errors), tuple(warnings), output)


def assert_pixelmed_clean(dataset_or_path: Dataset | Path,
                          allowed_warnings: dict[str, str] | None = None) -> PixelmedReport:
    """No error; every warning matches one of `allowed_warnings` ({substring: the reason we keep it})."""
    report = pixelmed_report(dataset_or_path)
    assert not report.errors, "pixelmed errors:\n" + "\n".join(report.errors)
    allowed = allowed_warnings or {}
    unexpected = [w for w in report.warnings if not any(pattern in w for pattern in allowed)]
    assert not unexpected, "pixelmed warnings not listed with a reason:\n" + "\n".join(unexpected)
    return report

"""A run folder as the spool would hand it to the worker, made from DICOM files (for tests)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from pydicom import dcmread

from node.spool import InstanceEntry, hash_key


def spool_run(tmp_path: Path, paths: list[Path]) -> Path:
    """Copy the files into `tmp_path/run` under their spool names, with a manifest line each."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "manifest.jsonl", "w") as manifest:
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            name = hash_key(str(ds.SOPInstanceUID)) + ".dcm"
            (run_dir / name).write_bytes(path.read_bytes())
            entry = InstanceEntry(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                  str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                                  str(ds.file_meta.TransferSyntaxUID), str(ds.ImageLaterality),
                                  str(ds.ViewPosition), name, path.stat().st_size, time.time(), "a")
            manifest.write(json.dumps(asdict(entry)) + "\n")
    return run_dir

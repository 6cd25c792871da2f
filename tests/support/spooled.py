"""A run folder as the spool would hand it to the worker, made from DICOM files (for tests)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pydicom import Dataset, dcmread

from node.runs import InstanceEntry
from node.spool import hash_key

if TYPE_CHECKING:
    from pipelines.study import LoadedView


def _manifest_line(manifest: IO[str], run_dir: Path, name: str, association: str) -> None:
    ds = dcmread(run_dir / name, stop_before_pixels=True)
    entry = InstanceEntry(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                          str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                          str(ds.file_meta.TransferSyntaxUID), str(ds.ImageLaterality),
                          str(ds.ViewPosition), name, (run_dir / name).stat().st_size,
                          time.time(), association)
    manifest.write(json.dumps(asdict(entry)) + "\n")


def spool_run(tmp_path: Path, paths: list[Path]) -> Path:
    """Copy the files into `tmp_path/run` under their spool names, with a manifest line each."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "manifest.jsonl", "w") as manifest:
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            name = hash_key(str(ds.SOPInstanceUID)) + ".dcm"
            (run_dir / name).write_bytes(path.read_bytes())
            _manifest_line(manifest, run_dir, name, "a")
    return run_dir


def spooled_views(tmp_path: Path, paths: list[Path]) -> list[LoadedView]:
    """The files spooled into `tmp_path/run` (`spool_run`) and decoded as the worker decodes a
    run's screening views."""
    from pipelines.study import decode_view, select_views

    return [decode_view(s) for s in select_views(spool_run(tmp_path, paths))[0]]


def spool_datasets(run_dir: Path, datasets: list[Dataset], association: str = "a") -> Path:
    """Save in-memory datasets into a new run folder `run_dir`, with a manifest line each."""
    run_dir.mkdir()
    with open(run_dir / "manifest.jsonl", "w") as manifest:
        for ds in datasets:
            name = hash_key(str(ds.SOPInstanceUID)) + ".dcm"
            ds.save_as(run_dir / name, enforce_file_format=True)
            _manifest_line(manifest, run_dir, name, association)
    return run_dir

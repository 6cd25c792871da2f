"""The model bundle's files, checked without torch.

`mammo-node config check` and the worker both need to know that a bundle folder holds a readable
`metadata.json` and a model file whose sha256 matches it: `model.pt2` (a `torch.export`
ExportedProgram, `"format": "pt2"`) or, for bundles exported before it, `model.ts` (TorchScript,
`"format": "torchscript"`, the default when `format` is absent). A bundle may also keep its
TorchScript copy beside a `model.pt2` (`torchscript_sha256`); that copy is checked too. The
checks live here, in `node/`, so the configuration check runs on a machine (or in a process)
without the scoring stack; `pipelines/model.py` adds the checks that need the model itself
(input size, a dry run).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from node.errors import ModelError

METADATA_FILE = "metadata.json"
MODEL_FILE = "model.ts"  # the TorchScript file (format "torchscript")
PT2_FILE = "model.pt2"  # the torch.export ExportedProgram (format "pt2")
MODEL_FILES = {"pt2": PT2_FILE, "torchscript": MODEL_FILE}
LEGACY_SHA_KEY = "torchscript_sha256"  # a TorchScript copy kept beside model.pt2
SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_KEYS = ("format_version", "name", "version", "input", "output", "operating_points",
                 "model_sha256")


def file_sha256(path: Path) -> str:
    """Streamed, so a large model file is never read whole just to be checked."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bundle_metadata(bundle_dir: Path) -> dict[str, Any]:
    """metadata.json as a JSON object with the keys every bundle has and a known format version."""
    if not bundle_dir.is_dir():
        raise ModelError(f"model bundle {bundle_dir}: folder not found")
    path = bundle_dir / METADATA_FILE
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model bundle {bundle_dir}: {METADATA_FILE} missing") from None
    except OSError as error:
        raise ModelError(f"{path}: cannot read: {error.strerror}") from None
    except ValueError as error:
        raise ModelError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: must be a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelError(f"{path}: missing key(s) {', '.join(missing)}")
    if metadata["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelError(f"{path}: format_version {metadata['format_version']!r} not supported "
                         f"(supported: {SUPPORTED_FORMAT_VERSIONS})")
    if metadata.get("format", "torchscript") not in MODEL_FILES:
        raise ModelError(f"{path}: format {metadata['format']!r} not supported "
                         f"(supported: {', '.join(MODEL_FILES)})")
    return metadata


def model_format(metadata: dict[str, Any]) -> str:
    """"pt2" or "torchscript" (a bundle without `format` predates .pt2: TorchScript)."""
    return str(metadata.get("format", "torchscript"))


def model_path(bundle_dir: Path, metadata: dict[str, Any]) -> Path:
    """The file that is the model, by the bundle's `format`."""
    return bundle_dir / MODEL_FILES[model_format(metadata)]


def _check_sha(path: Path, expected: object) -> None:
    if not path.is_file():
        raise ModelError(f"model bundle {path.parent}: {path.name} missing")
    try:
        actual = file_sha256(path)
    except OSError as error:
        raise ModelError(f"{path}: cannot read: {error.strerror}") from None
    if actual != expected:
        raise ModelError(f"{path}: sha256 {actual[:12]}… does not match {METADATA_FILE} "
                         f"({str(expected)[:12]}…)")


def check_bundle_files(bundle_dir: Path) -> dict[str, Any]:
    """The metadata, after checking that the model file is there and is the one it describes
    (and so is the TorchScript copy a .pt2 bundle keeps beside it, when it lists one)."""
    metadata = read_bundle_metadata(bundle_dir)
    _check_sha(model_path(bundle_dir, metadata), metadata["model_sha256"])
    if model_format(metadata) == "pt2" and metadata.get(LEGACY_SHA_KEY):
        _check_sha(bundle_dir / MODEL_FILE, metadata[LEGACY_SHA_KEY])
    return metadata

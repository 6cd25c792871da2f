"""A second model bundle for tests: the shipped one copied under another name and version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tools.stack.node_stack import DEFAULT_BUNDLE


def renamed_bundle(target: Path, name: str, version: str, source: Path = DEFAULT_BUNDLE) -> Path:
    """`source` copied to `target` with metadata.json's name and version changed (the model file
    and so its sha256 are the same: the records of runs tell the two apart by name)."""
    shutil.copytree(source, target)
    metadata_path = target / "metadata.json"
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    metadata.update(name=name, version=version)
    metadata_path.write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return target

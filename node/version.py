"""The installed mammo-node version: one answer for `mammo-node --version`, logs and the objects we write."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

DISTRIBUTION = "mammo-node"


@lru_cache(maxsize=1)
def software_version() -> str:
    """The installed mammo-node version (pyproject.toml), as the node reports it everywhere."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a checkout run without `pip install -e .`
        return "0+unknown"

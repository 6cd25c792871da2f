"""The one way tests build a node configuration: a small valid base, keyword overrides merged in.

Each test names only the sections it is about; the rest comes from here, so a new required
setting is added in one place rather than in every test module. Overrides are deep-merged:
a mapping merges key by key into the base section (``node={"network_timeout_s": 20}`` keeps the
base's port and AE title), anything else (a list of callers or destinations, a number) replaces.

With ``listener=True`` the base is a node that listens: MAMMO_NODE on a free loopback port, the
caller pinned to 127.0.0.1, no free-space floor, a broker URL on a free port where nobody listens
(publishing fails fast), and a completion quiet period long enough that no study completes while
a test is still sending.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from node.settings import Settings, parse_settings
from tools.stack.node_stack import merge_config
from tools.stack.services import free_port


def config_data(root: Path, *, listener: bool = False, **overrides: Any) -> dict[str, Any]:
    """A config mapping whose spool lives in `root`, as a node.yaml would hold it."""
    base: dict[str, Any] = {
        "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
        "spool": {"dir": str(root / "spool")},
    }
    if listener:
        base = merge_config(base, {
            "node": {"ae_title": "MAMMO_NODE", "bind_address": "127.0.0.1", "port": free_port(),
                     "network_timeout_s": 10},
            "spool": {"min_free_bytes": 0},
            "completion": {"quiet_period_s": 600, "deadline_s": 900},
            "broker": {"url": f"redis://127.0.0.1:{free_port()}/0", "publish_timeout_s": 0.5},
        })
    return merge_config(base, overrides)


def make_settings(root: Path, *, listener: bool = False, **overrides: Any) -> Settings:
    """Parsed settings, validated exactly as the node validates its config file."""
    return parse_settings(config_data(root, listener=listener, **overrides))


def write_config(path: Path, *, listener: bool = False, **overrides: Any) -> Path:
    """A node.yaml at `path` (spool beside it), for code under test that reads a config file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_data(path.parent, listener=listener, **overrides)))
    return path

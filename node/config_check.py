"""What `mammo-node config check` verifies beyond the schema, offline.

The schema (node/settings.py) says a file is well formed; this says the node could start with it
on this machine: the broker password's variable is set, the model bundle is there and matches its
metadata (read without torch: node/bundle.py), the spool and the audit trail can be created and
written, the TLS files load; with `pipelines`, every pipeline's bundle (and shadow bundle) and
SOP classes. Nothing here touches the network. Each problem is one line naming
the key, and no line ever carries a secret (the password's variable is named, never read out).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from node.bundle import check_bundle_files
from node.errors import ConfigError, ModelError
from node.settings import ModelSection, Settings, redact_secrets
from node.tls import client_context, server_context
from node.vocabulary import storage_sop_classes_named


def offline_problems(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem found, one `key: what is wrong` line each; empty when the node could start."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    if not environ.get(settings.broker.password_env):
        problems.append(f"broker.password_env: the environment variable "
                        f"{settings.broker.password_env} is not set (the broker password)")
    monitoring = settings.monitoring
    if monitoring is not None and monitoring.token_env and not environ.get(monitoring.token_env):
        problems.append(f"monitoring.token_env: the environment variable {monitoring.token_env} "
                        "is not set (the bearer token of /metrics, /healthz, /readyz)")
    for key, bundle_dir in _bundles(settings):
        try:
            check_bundle_files(bundle_dir)
        except ModelError as error:
            problems.append(f"{key}: {error}")
    problems += pipeline_problems(settings)
    problems += _undeclared_domains(settings)
    problems += _unknown_operating_points(settings)
    problems += _directory_problems("spool.dir", settings.spool.dir)
    problems += _file_problems("audit.path", settings.audit_path)
    problems += tls_problems(settings)
    return [redact_secrets(line) for line in problems]


def _models(settings: Settings) -> list[tuple[str, ModelSection]]:
    """Every model section the config has, with its key: the live and shadow model of each
    pipeline (without `pipelines`: `model` and `shadow_model`)."""
    if not settings.pipelines:
        found = [("model", settings.model)]
        if settings.shadow_model is not None:
            found.append(("shadow_model", settings.shadow_model))
        return found
    found = []
    for index, pipeline in enumerate(settings.pipelines):
        found.append((f"pipelines[{index}].model", pipeline.model))
        if pipeline.shadow_model is not None:
            found.append((f"pipelines[{index}].shadow_model", pipeline.shadow_model))
    return found


def _bundles(settings: Settings) -> list[tuple[str, Path]]:
    """Every model bundle the config names, with its key. A shadow promoted to `model` is
    checked like any live bundle."""
    return [(f"{key}.bundle_dir", model.bundle_dir) for key, model in _models(settings)]


def _unknown_operating_points(settings: Settings) -> list[str]:
    """A model whose `operating_point` its bundle does not declare (metadata.json
    `operating_points`): its worker would refuse to start."""
    problems = []
    for key, model in _models(settings):
        try:
            metadata = json.loads((model.bundle_dir / "metadata.json").read_text())
        except (OSError, ValueError):
            continue  # check_bundle_files has said so
        points = metadata.get("operating_points") if isinstance(metadata, dict) else None
        if not isinstance(points, dict) or model.operating_point not in points:
            declared = ", ".join(sorted(points)) if isinstance(points, dict) else "none"
            problems.append(f"{key}.operating_point: {model.operating_point!r} is not one of "
                            f"the bundle's operating points ({declared})")
    return problems


def operating_point_notes(settings: Settings) -> list[str]:
    """For each model the config names, what its operating point means in the bundle's own
    cross-validation: how many normal women's exams it flagged (metadata.json
    `metrics.subgroups.exams`, else `operating_points_detail`), the recall rate a screening
    population should sit near (the recall-rate alerts compare each source against it). Nothing
    for a bundle that gives no per-exam figure."""
    from node.drift import normal_exam_flag_rate, normal_exams_flagged

    notes = []
    for key, model in _models(settings):
        try:
            metadata = json.loads((model.bundle_dir / "metadata.json").read_text())
            threshold = float(metadata["operating_points"][model.operating_point])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # the problems above have said so
        rate = normal_exam_flag_rate(metadata, model.operating_point)
        if rate is None:
            continue
        flagged = normal_exams_flagged(metadata, model.operating_point)
        counts = f"{flagged[0]} of {flagged[1]} " if flagged else ""
        try:
            per_woman = float(metadata["metrics"]["subgroups"]["exams"]["images_per_woman"])
            images = f", {per_woman:g} images each"
        except (KeyError, TypeError, ValueError):
            images = ""
        notes.append(f"{key}: {metadata.get('name')} {metadata.get('version')} at its "
                     f"{model.operating_point} operating point ({threshold:.3f}) flagged "
                     f"{counts}normal women's exams ({rate:.1%}{images}) in its cross-validation: "
                     "about the recall rate to expect of a screening population")
    return notes


def _undeclared_domains(settings: Settings) -> list[str]:
    """A pipeline with `outside_domain: skip` (its own, else `scoring.outside_domain`) whose live
    bundle declares no (valid) `domain`: nothing could be found outside it, so every image
    would be scored after all."""
    from pipelines.quality import Domain

    problems = []
    for index, pipeline in enumerate(settings.pipeline_list):
        if pipeline.outside_domain != "skip":
            continue
        key = "model.bundle_dir" if not settings.pipelines else f"pipelines[{index}].model.bundle_dir"
        try:
            metadata = json.loads((pipeline.model.bundle_dir / "metadata.json").read_text())
        except (OSError, ValueError):
            continue  # check_bundle_files has said so
        if Domain.from_metadata(metadata if isinstance(metadata, dict) else None) is None:
            problems.append(f"{key}: outside_domain is skip, but the bundle's metadata.json "
                            "declares no domain: every image would be scored")
    return problems


def pipeline_problems(settings: Settings) -> list[str]:
    """What the schema cannot say about `pipelines` (needs the node's DICOM vocabulary): each
    one's SOP classes are storage SOP classes the node takes. Checked with --schema-only too."""
    problems = []
    for index, pipeline in enumerate(settings.pipelines):
        try:
            storage_sop_classes_named(pipeline.sop_classes)
        except ValueError as error:
            problems.append(f"pipelines[{index}].sop_classes: {error}")
    return problems


def tls_problems(settings: Settings) -> list[str]:
    """Each configured certificate and key, loaded now, so a bad file fails here, not at a handshake."""
    problems = []
    listeners = [("node.tls", settings.node.tls)]
    if settings.monitoring is not None:
        listeners.append(("monitoring.tls", settings.monitoring.tls))
    for key, tls in listeners:
        if tls is not None:
            try:
                server_context(tls, key)
            except ConfigError as error:
                problems.append(str(error))
    for index, destination in enumerate(settings.destinations):
        if destination.tls is not None:
            try:
                client_context(destination.tls, f"destinations[{index}].tls")
            except ConfigError as error:
                problems.append(str(error))
    return problems


def _directory_problems(key: str, path: Path) -> list[str]:
    """A folder the node writes in: there and writable, or creatable (its nearest parent writable)."""
    if path.exists():
        if not path.is_dir():
            return [f"{key}: {path} exists and is not a folder"]
        try:
            handle, probe = tempfile.mkstemp(prefix=".config-check-", dir=path)
        except OSError as error:
            return [f"{key}: {path} is not writable by this user ({error.strerror})"]
        os.close(handle)
        os.unlink(probe)
        return []
    parent = _nearest_existing(path)
    if not parent.is_dir():
        return [f"{key}: {path} cannot be created: {parent} is not a folder"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{key}: {path} cannot be created: {parent} is not writable by this user"]
    return []


def _file_problems(key: str, path: Path) -> list[str]:
    """A file the node appends to: writable if there, else its folder writable or creatable."""
    if path.exists():
        if path.is_dir():
            return [f"{key}: {path} is a folder, not a file"]
        if not os.access(path, os.W_OK):
            return [f"{key}: {path} is not writable by this user"]
        return []
    return _directory_problems(key, path.parent)


def _nearest_existing(path: Path) -> Path:
    for candidate in path.parents:
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")

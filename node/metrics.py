"""Every Prometheus metric the node exports, defined once (no torch, no I/O at import).

Two kinds:
- **Instrumented** metrics (counters, histograms) live in prometheus_client's default registry
  and are bumped at the hop that knows the fact: the listener (associations, instances, bytes),
  the worker (runs finished, stage latencies, sends, scores). In a Celery prefork worker the
  pool children write them into prometheus_client's multiprocess files
  (`PROMETHEUS_MULTIPROC_DIR`, set by `mammo-node worker` before anything imports
  prometheus_client) and the worker's endpoint sums them (node/monitoring.py).
- **State** gauges, read when Prometheus scrapes `serve` (runs by state from the spool, queue
  depth and worker heartbeats from Redis, spool free space): `STATE_GAUGES` names them and
  node/monitoring.py:NodeStateCollector fills them.

No PHI: labels are AE titles, manufacturer names, model names, destination names, DICOM status
codes, stages and reasons, never UIDs or patient attributes. Values that come from received data
(manufacturer) are cleaned and capped so a sender cannot blow up the label space.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from node.runs import InstanceEntry, RunRecord

# --- the listener (serve) ----------------------------------------------------------------------
ASSOCIATIONS = Counter(
    "mammo_associations", "Association requests by outcome (accepted, rejected) and reason",
    ["outcome", "reason"])
ASSOCIATIONS_ABORTED = Counter(
    "mammo_associations_aborted", "Associations aborted (by us or the peer) by reason", ["reason"])
INSTANCES_RECEIVED = Counter(
    "mammo_instances_received", "Instances stored in the spool (answered 0x0000) by calling AE",
    ["calling_ae"])
RECEIVED_BYTES = Counter(
    "mammo_received_bytes", "Bytes of instances stored in the spool by calling AE", ["calling_ae"])
INSTANCES_REJECTED = Counter(
    "mammo_instances_rejected", "C-STOREs answered with an error status, by status", ["status"])

# --- the worker ----------------------------------------------------------------------------------
STAGES = ("completion", "queue", "decode", "preprocess", "inference", "heatmap", "write", "send",
          "total")
STAGE_SECONDS = Histogram(
    "mammo_stage_duration_seconds",
    "Seconds per stage of a run: completion wait (last instance to claim), queue wait (claim to "
    "worker), decode, preprocess, inference, heatmap, write, send, total (worker)",
    ["stage"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
RUNS_FINISHED = Counter(
    "mammo_runs_finished", "Runs a worker finished, by state (done, failed) and error kind",
    ["state", "error_kind"])
SENDS = Counter(
    "mammo_sends", "Result objects sent, by destination and outcome (stored, failed, refused: "
    "the destination accepts no presentation context for them)",
    ["destination", "outcome"])
SCORE_BUCKETS = tuple(round(0.05 * step, 2) for step in range(1, 21))
EXAM_SCORE = Histogram(
    "mammo_exam_score", "Exam scores by model version and source (calling AE, manufacturer)",
    ["model", "model_version", "calling_ae", "manufacturer"], buckets=SCORE_BUCKETS)
EXAM_VERDICTS = Counter(
    "mammo_exam_verdicts", "Scored exams by verdict (suspicious, not_suspicious) at the "
    "configured operating point, by model version and source (calling AE, manufacturer): the "
    "share called suspicious is the node's recall rate",
    ["model", "model_version", "operating_point", "calling_ae", "manufacturer", "verdict"])
INPUT_QUALITY_FLAGS = Counter(
    "mammo_input_quality_flags",
    "Input images of finished runs by quality flag (pipelines/quality.py: view_missing, "
    "laterality_missing, implant_present, wrong_body_part, low_contrast, for_processing)",
    ["flag"])
MODEL_LOADED = Gauge(
    "mammo_worker_model_loaded", "Worker processes of this worker with the model loaded",
    ["model", "model_version"], multiprocess_mode="livesum")
NORMAL_EXAM_FLAG_RATE = Gauge(
    "mammo_model_normal_exam_flag_rate",
    "Share of normal women's exams the loaded bundle's cross-validation flagged at the "
    "configured operating point (1 - its exam specificity, metadata.json "
    "operating_points_detail): what the recall rate of a screening population should be near",
    ["model", "model_version", "operating_point"], multiprocess_mode="livemax")

# --- state read at scrape time (serve) --------------------------------------------------------
# name -> (help, labels); filled by node/monitoring.py:NodeStateCollector.
STATE_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mammo_runs": ("Runs in the spool by state", ("state",)),
    "mammo_incoming_studies": ("Studies still arriving (incoming/, not yet claimed)", ()),
    "mammo_queue_depth": ("Score messages waiting in the broker queue", ()),
    "mammo_broker_up": ("1 when the broker answered this scrape, else 0", ()),
    "mammo_spool_free_bytes": ("Free bytes on the spool's filesystem", ()),
    "mammo_spool_min_free_bytes": ("The spool's free-space watermark (spool.min_free_bytes)", ()),
    "mammo_spool_writable": ("1 when a file could be created in the spool this scrape", ()),
    "mammo_destinations": ("Configured destinations", ()),
    "mammo_worker_last_seen_age_seconds": (
        "Seconds since each worker's last heartbeat, with its model bundle",
        ("worker", "model", "model_version")),
    "mammo_worker_ready_processes": (
        "Processes with the model loaded, per worker (from its last heartbeat)",
        ("worker", "model", "model_version")),
}

# Score drift per source against the bundle's reference, computed by `serve` at each scrape
# from the rolling store (node/drift.py:DriftCollector); name -> (help, labels).
DRIFT_LABELS = ("model", "model_version", "calling_ae", "manufacturer")
DRIFT_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mammo_score_drift_psi": (
        "Population stability index of the source's image scores (last drift.window exams) "
        "against the bundle's out-of-fold reference, over its decile bins", DRIFT_LABELS),
    "mammo_score_drift_ks": (
        "Kolmogorov-Smirnov statistic of the source's image scores against the bundle's "
        "reference", DRIFT_LABELS),
    "mammo_score_drift_exams": ("Exams in the source's drift window", DRIFT_LABELS),
}

_LABEL_RE = re.compile(r"[^\x20-\x7e]")
MAX_MANUFACTURERS = 32  # distinct manufacturer labels per process; more become "other"
_manufacturers: set[str] = set()
_manufacturers_lock = threading.Lock()


def clean_label(value: object, limit: int = 64) -> str:
    """A label value from received data: printable ASCII, trimmed, at most `limit` characters."""
    return _LABEL_RE.sub("", str(value or "")).strip()[:limit]


def _manufacturer_label(value: object) -> str:
    text = clean_label(value) or "unknown"
    with _manufacturers_lock:
        if text in _manufacturers or len(_manufacturers) < MAX_MANUFACTURERS:
            _manufacturers.add(text)
            return text
    return "other"


@dataclass(frozen=True)
class RunSource:
    """Where a study came from, for the score histograms: the calling AE and the manufacturer."""

    calling_ae: str
    manufacturer: str


def run_source(run_dir: Path, manifest: Sequence[InstanceEntry]) -> RunSource:
    """The source of a run: the calling AE of its first instance, the manufacturer in its header
    (read here, header only, so the receive path stores nothing more)."""
    if not manifest:
        return RunSource("unknown", "unknown")
    first = manifest[0]
    manufacturer: object = ""
    try:
        from pydicom import dcmread

        header = dcmread(run_dir / first.file, stop_before_pixels=True,
                         specific_tags=["Manufacturer"])
        manufacturer = header.get("Manufacturer", "")
    except Exception:  # an unreadable header only costs the label
        manufacturer = ""
    return RunSource(clean_label(first.calling_ae) or "unknown", _manufacturer_label(manufacturer))


def observe_run(record: RunRecord, source: RunSource) -> None:
    """Count one finished run: its state, its stage times, its sends, its exam score and
    verdict."""
    error_kind = record.error.kind.value if record.error is not None else ""
    RUNS_FINISHED.labels(state=record.state, error_kind=error_kind).inc()
    for stage, seconds in (record.timings_s or {}).items():
        if stage in STAGES and seconds >= 0:
            STAGE_SECONDS.labels(stage=stage).observe(seconds)
    for send in record.sends or ():
        if send.earlier:
            continue  # counted by the attempt that stored it
        outcome = "stored" if send.ok else "refused" if send.refused else "failed"
        SENDS.labels(destination=send.destination, outcome=outcome).inc()
    for described in record.inputs or ():
        for flag in described.quality_flags or ():
            INPUT_QUALITY_FLAGS.labels(flag=clean_label(flag, 48)).inc()  # outside_domain:… too
    if record.scores is not None and record.model is not None:
        EXAM_SCORE.labels(model=record.model.name, model_version=record.model.version,
                          calling_ae=source.calling_ae,
                          manufacturer=source.manufacturer).observe(record.scores.exam)
        EXAM_VERDICTS.labels(model=record.model.name, model_version=record.model.version,
                             operating_point=clean_label(record.scores.operating_point_name),
                             calling_ae=source.calling_ae, manufacturer=source.manufacturer,
                             verdict="suspicious" if record.scores.suspicious
                             else "not_suspicious").inc()


def exported_names() -> frozenset[str]:
    """Every sample name the node can export (the dashboard and alert tests check against it)."""
    names: set[str] = set(STATE_GAUGES) | set(DRIFT_GAUGES)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for metric in (ASSOCIATIONS, ASSOCIATIONS_ABORTED, INSTANCES_RECEIVED, RECEIVED_BYTES,
                   INSTANCES_REJECTED, STAGE_SECONDS, RUNS_FINISHED, SENDS, EXAM_SCORE,
                   EXAM_VERDICTS, INPUT_QUALITY_FLAGS, MODEL_LOADED, NORMAL_EXAM_FLAG_RATE):
        for family in metric.describe():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return frozenset(names)

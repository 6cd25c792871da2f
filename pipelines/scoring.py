"""One run, end to end inside a worker: load, score, write, send, record.

`process_run` is plain Python (the Celery task is a thin wrapper around it), so tests can drive it
directly. Errors follow DESIGN.md: InputError fails the run without retry; a destination that
stays unreachable after the configured attempts parks the run in failed/ with the reason.

It is idempotent, which is half of the exactly-once argument (docs/RELIABILITY.md): a run that
is not in queued/ or abandoned in work/ is not ours (a duplicate message does nothing), and the
result UIDs are deterministic, so a run scored again after a crash sends the same objects.

`MAMMO_NODE_TEST_PAUSE_BEFORE_INFERENCE_S` (environment, seconds, default 0) makes the worker
sleep while it holds a run, just before inference: the fault tests use it to kill a worker
"mid-inference" deterministically. Never set it in production.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom import Dataset

from node.audit import AuditLog, open_audit
from node.errors import InputError
from node.logs import get_logger
from node.scu import SendOutcome, send_files
from node.settings import Settings
from node.spool import (
    RECORD_NAME,
    RUN_NAME,
    SUPERSEDED_NAME,
    Spool,
    read_manifest,
    write_json_atomic,
)
from pipelines.results import SCREENING_VIEWS, ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.seg import build_seg
from pipelines.sr import build_sr
from pipelines.study import LoadedView, Skipped, decode_view, select_views

log = get_logger("pipelines.scoring")

OUTPUTS_DIR = "outputs"
TEST_PAUSE_ENV = "MAMMO_NODE_TEST_PAUSE_BEFORE_INFERENCE_S"


class Predictor(Protocol):
    """What the scoring needs of a model runner (pipelines.model.ModelRunner provides it)."""

    identity: ModelIdentity
    last_timings_s: dict[str, float]

    def predict(self, images: list[np.ndarray]) -> list[Any]: ...


def _load_views(run_dir: Path) -> tuple[list[LoadedView], list[Skipped]]:
    selected, skipped = select_views(run_dir)
    loaded = []
    for view in selected:
        try:
            loaded.append(decode_view(view))
        except InputError as error:
            skipped.append(Skipped(view.entry.sop_uid, f"not_decoded:{error}"))
            log.warning("view_not_decoded", sop_uid=view.entry.sop_uid, view=view.entry.view_key,
                        reason=str(error)[:200])
    return loaded, skipped


def score_views(
    views: list[LoadedView], predictor: Predictor, study_uid: str
) -> tuple[StudyResult, list[np.ndarray]]:
    """Per-view probability and heatmap on the source grid; breast = max of views, exam = max."""
    predictions = predictor.predict([v.pixels for v in views])
    scores, heatmaps = [], []
    for view, prediction in zip(views, predictions, strict=True):
        scores.append(
            ViewScore(
                sop_uid=view.entry.sop_uid,
                sop_class_uid=view.entry.sop_class_uid,
                series_uid=view.entry.series_uid,
                laterality=view.entry.laterality,
                view=view.entry.view,
                probability=float(prediction.probability),
            )
        )
        # The same flips take the heatmap from the model's orientation back to the source's.
        heatmaps.append(view.orientation.apply(np.asarray(prediction.heatmap, dtype=np.float32)))
    breast_scores: dict[str, float] = {}
    for score in scores:
        breast_scores[score.laterality] = max(breast_scores.get(score.laterality, 0.0),
                                              score.probability)
    present = {s.view_key for s in scores}
    result = StudyResult(
        study_uid=study_uid,
        views=tuple(scores),
        breast_scores=breast_scores,
        exam_score=max(breast_scores.values()),
        missing_views=tuple(k for k in SCREENING_VIEWS if k not in present),
    )
    return result, heatmaps


def write_outputs(
    settings: Settings,
    views: list[LoadedView],
    result: StudyResult,
    heatmaps: list[np.ndarray],
    identity: ModelIdentity,
    out_dir: Path,
) -> list[dict[str, str]]:
    """Build the SR and one SEG per scored image; files under out_dir, described for the record."""
    out_dir.mkdir(exist_ok=True)
    outputs: list[dict[str, str]] = []
    cfg = settings.outputs

    def _save(kind: str, name: str, dataset: Dataset) -> None:
        path = out_dir / name
        dataset.save_as(path, enforce_file_format=True)
        outputs.append({"kind": kind, "file": f"{OUTPUTS_DIR}/{name}",
                        "sop_uid": str(dataset.SOPInstanceUID),
                        "series_uid": str(dataset.SeriesInstanceUID)})

    headers = [v.header for v in views]
    segs: list[Dataset] = []
    if cfg.seg.enabled:
        spec = OutputSpec(cfg.seg.series_number, cfg.seg.series_description, cfg.uid_root)
        for index, (view, heatmap) in enumerate(zip(views, heatmaps, strict=True)):
            seg = build_seg(view.header, heatmap, identity, spec)
            _save("seg", f"seg-{index + 1}-{view.entry.view_key}.dcm", seg)
            segs.append(seg)
    if cfg.sr.enabled:
        spec = OutputSpec(cfg.sr.series_number, cfg.sr.series_description, cfg.uid_root)
        # The SR lists the run's SEGs as evidence, so a viewer can go from the scores to the maps.
        _save("sr", "sr.dcm", build_sr(headers, result, identity, spec, seg_refs=segs))
    return outputs


def send_outputs(settings: Settings, files: list[Path]) -> tuple[list[dict[str, Any]], str | None]:
    """Send to every destination with retries and backoff; (per-object log, failure reason)."""
    sends: list[dict[str, Any]] = []
    failures = []
    for destination in settings.destinations:
        pending = list(files)
        outcomes: dict[Path, SendOutcome] = {}
        for attempt in range(1, settings.send.attempts + 1):
            try:
                results = send_files(settings, destination, pending)
            except Exception as error:  # an unexpected SCU failure is one failed attempt
                log.warning("send_attempt_failed", destination=destination.name,
                            reason=type(error).__name__, attempt=attempt)
                results = [SendOutcome("", None) for _ in pending]
            for path, outcome in zip(pending, results, strict=True):
                outcomes[path] = outcome
            pending = [p for p in pending if not outcomes[p].ok]
            if not pending:
                break
            if attempt < settings.send.attempts:
                delay_s = min(settings.send.backoff_max_s, settings.send.backoff_s * 2 ** (attempt - 1))
                log.warning("send_retry_scheduled", destination=destination.name,
                            pending=len(pending), attempt=attempt, retry_in_s=delay_s)
                time.sleep(delay_s)
        for path in files:
            outcome = outcomes[path]
            status = None if outcome.status is None else f"0x{outcome.status:04X}"
            sends.append({"destination": destination.name, "file": path.name,
                          "sop_uid": outcome.sop_uid, "status": status, "ok": outcome.ok})
        if pending:
            statuses = sorted({str(s["status"]) for s in sends
                               if s["destination"] == destination.name and not s["ok"]})
            failures.append(f"{destination.name}: {len(pending)} object(s) not stored after "
                            f"{settings.send.attempts} attempts (status {', '.join(statuses)})")
    return sends, ("; ".join(failures) or None)


def process_run(settings: Settings, spool: Spool, run_id: str, predictor: Predictor) -> str | None:
    """Score and deliver one run; returns the final state, or None if it was not ours to do."""
    with spool.hold_run(run_id) as run_dir:
        if run_dir is None:
            log.info("run_skipped_duplicate_delivery", run_id=run_id)
            return None
        audit = open_audit(settings, "worker")
        superseded_by = _superseded_by(run_dir)
        if superseded_by:
            return _skip_superseded(spool, run_id, run_dir, superseded_by)
        return _process_held_run(settings, spool, run_id, run_dir, predictor, audit)


def _superseded_by(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / SUPERSEDED_NAME).read_text()).get("superseded_by")
    except (OSError, ValueError):
        return None


def _skip_superseded(spool: Spool, run_id: str, run_dir: Path, superseded_by: str) -> str:
    """A later run of the study took over these instances before we started: nothing to score."""
    run_info = json.loads((run_dir / RUN_NAME).read_text())
    record = {"run_id": run_id, "study_uid": run_info.get("study_uid", ""), "state": "done",
              "completion_reason": run_info.get("completion_reason"),
              "superseded_by": superseded_by, "outputs": [], "sends": [],
              "not_scored": f"superseded by run {superseded_by} before scoring"}
    write_json_atomic(run_dir / RECORD_NAME, record)
    spool.finish_run(run_id, "done")
    log.info("run_superseded", run_id=run_id, study_uid=record["study_uid"],
             superseded_by=superseded_by)
    return "done"


def _process_held_run(
    settings: Settings, spool: Spool, run_id: str, run_dir: Path, predictor: Predictor,
    audit: AuditLog,
) -> str:
    started = time.time()
    run_info = json.loads((run_dir / RUN_NAME).read_text())
    record: dict[str, Any] = {
        "run_id": run_id,
        "study_uid": run_info.get("study_uid", ""),
        "completion_reason": run_info.get("completion_reason"),
        "model": {"name": predictor.identity.name, "version": predictor.identity.version},
        "attempts": int(run_info.get("attempts", 0)) + 1,
        "timings_s": _waiting_times(run_dir, run_info, started),
    }
    if run_info.get("supersedes"):
        record["supersedes"] = run_info["supersedes"]
    run_info["attempts"] = record["attempts"]
    write_json_atomic(run_dir / RUN_NAME, run_info)
    state, error = "done", None
    try:
        if record["attempts"] > settings.scoring.max_attempts:
            # Earlier attempts died mid-run (the worker was killed): a poison study must not
            # take the worker down forever.
            raise InputError(f"gave up after {record['attempts'] - 1} attempts that did not finish")
        error = _score_write_send(settings, run_dir, predictor, record, audit)
    except InputError as failure:
        error = f"input: {failure}"
    except Exception as failure:  # a bug must park the run, not lose it
        log.exception("run_crashed", run_id=run_id)
        error = f"internal: {type(failure).__name__}: {failure}"[:500]
    if error:
        state = "failed"
        record["error"] = error
    record["state"] = state
    record["timings_s"]["total"] = round(time.time() - started, 3)
    write_json_atomic(run_dir / RECORD_NAME, record)
    spool.finish_run(run_id, state)  # type: ignore[arg-type]
    if state == "failed":
        audit.record("study_failed", run_id=run_id, study_uid=record["study_uid"], reason=error,
                     attempts=record["attempts"])
    scores = record.get("scores", {})
    log.info(
        "study_processed",
        run_id=run_id,
        study_uid=record["study_uid"],
        state=state,
        reason=error,
        views_scored=len(scores.get("views", {})),
        missing_views=record.get("missing_views", []),
        exam_score=scores.get("exam"),
        outputs=len(record.get("outputs", [])),
        model_version=predictor.identity.version,
        timings_s=record["timings_s"],
    )
    return state


def _waiting_times(run_dir: Path, run_info: dict[str, Any], started: float) -> dict[str, float]:
    """Seconds from the last instance to the claim (completion) and from the claim to here."""
    claimed_at = float(run_info.get("claimed_at", started))
    received = [e.received_at for e in read_manifest(run_dir)]
    waits = {"queue": round(started - claimed_at, 3)}
    if received:
        waits = {"completion": round(claimed_at - max(received), 3), **waits}
    return waits


def _score_write_send(
    settings: Settings, run_dir: Path, predictor: Predictor, record: dict[str, Any],
    audit: AuditLog,
) -> str | None:
    timings = record["timings_s"]
    t0 = time.perf_counter()
    views, skipped = _load_views(run_dir)
    timings["decode"] = round(time.perf_counter() - t0, 3)
    record["inputs"] = _describe_inputs(run_dir, views, skipped)
    if not views:
        reasons = sorted({s.reason for s in skipped}) or ["no instances"]
        if any(r.startswith("not_decoded") for r in reasons) or not skipped:
            raise InputError("no scorable view: " + "; ".join(reasons)[:400])
        # Only objects we accept but do not score (tomosynthesis, other views): nothing to send,
        # and nothing went wrong.
        record["not_scored"] = "no scorable view: " + "; ".join(reasons)[:400]
        record["outputs"], record["sends"], record["missing_views"] = [], [], []
        return None
    pause_s = float(os.environ.get(TEST_PAUSE_ENV, "0") or 0)
    if pause_s > 0:
        log.warning("test_pause_before_inference", run_id=record["run_id"], pause_s=pause_s)
        time.sleep(pause_s)
    result, heatmaps = score_views(views, predictor, record["study_uid"])
    for key, value in predictor.last_timings_s.items():
        timings[key] = round(value, 3)
    record["scores"] = {
        "views": {s.view_key: round(s.probability, 6) for s in result.views},
        "breasts": {k: round(v, 6) for k, v in result.breast_scores.items()},
        "exam": round(result.exam_score, 6),
        "operating_point": predictor.identity.operating_point,
        "suspicious": result.exam_score >= predictor.identity.operating_point,
    }
    record["missing_views"] = list(result.missing_views)
    audit.record("study_scored", run_id=record["run_id"], study_uid=record["study_uid"],
                 views_scored=len(result.views), exam_score=record["scores"]["exam"],
                 model=predictor.identity.name, model_version=predictor.identity.version)
    t0 = time.perf_counter()
    outputs = write_outputs(settings, views, result, heatmaps, predictor.identity,
                            run_dir / OUTPUTS_DIR)
    timings["write"] = round(time.perf_counter() - t0, 3)
    record["outputs"] = outputs
    t0 = time.perf_counter()
    sends, failure = send_outputs(settings, [run_dir / o["file"] for o in outputs])
    timings["send"] = round(time.perf_counter() - t0, 3)
    record["sends"] = sends
    _audit_sends(audit, record, sends)
    return f"send: {failure}" if failure else None


def _audit_sends(audit: AuditLog, record: dict[str, Any], sends: list[dict[str, Any]]) -> None:
    """One audit event per destination: everything stored, or what was not."""
    for destination in dict.fromkeys(s["destination"] for s in sends):
        mine = [s for s in sends if s["destination"] == destination]
        failed = [s for s in mine if not s["ok"]]
        fields = {"run_id": record["run_id"], "study_uid": record["study_uid"],
                  "destination": destination, "objects": len(mine),
                  "sop_uids": [s["sop_uid"] for s in mine]}
        if failed:
            audit.record("results_send_failed", **fields, not_stored=len(failed),
                         statuses=sorted({str(s["status"]) for s in failed}))
        else:
            audit.record("results_sent", **fields)


def _describe_inputs(run_dir: Path, views: list[LoadedView], skipped: list[Skipped]) -> list[dict]:
    reasons = {s.sop_uid: s.reason for s in skipped}
    scored = {v.entry.sop_uid for v in views}
    described = []
    for entry in read_manifest(run_dir):
        item = asdict(entry)
        item.pop("association_id", None)
        item["scored"] = entry.sop_uid in scored
        if entry.sop_uid in reasons:
            item["reason"] = reasons[entry.sop_uid]
        described.append(item)
    return described

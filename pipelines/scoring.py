"""One run, end to end inside a worker: load, score, write, send, record.

`process_run` is plain Python (the Celery task is a thin wrapper around it), so tests can drive it
directly. Errors follow docs/ARCHITECTURE.md (*Errors*): InputError fails the run without retry;
a destination that stays unreachable after the configured attempts parks the run in failed/ with
the reason.

It is idempotent, which is half of the exactly-once argument (docs/RELIABILITY.md): a run that
is not in queued/ or abandoned in work/ is not ours (a duplicate message does nothing), and the
result UIDs are deterministic, so a run scored again after a crash sends the same objects.

`MAMMO_NODE_TEST_PAUSE_BEFORE_INFERENCE_S` (environment, seconds, default 0) makes the worker
sleep while it holds a run, just before inference: the fault tests use it to kill a worker
"mid-inference" deterministically. Never set it in production.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node import metrics
from node.audit import AuditLog, open_audit
from node.drift import DriftStore, ExamEntry, SourceKey, reference_for_store
from node.errors import ConfigError, InputError
from node.leases import Lease, LeaseLost, Leases, hold_claimed_run
from node.logs import get_logger
from node.runs import (
    PREVIOUS_RECORD_NAME,
    FailureKind,
    InputDescription,
    InstanceEntry,
    ModelRef,
    OutputFile,
    RunFailure,
    RunInfo,
    RunRecord,
    Scores,
    SendResult,
    append_sent,
    attempts_exhausted,
    read_manifest,
    read_record,
    read_run_info,
    read_sent,
    read_superseded,
    write_record,
    write_run_info,
)
from node.scu import SendOutcome, send_files
from node.settings import (
    IMPLICIT_PIPELINE,
    Destination,
    DicomWebDestination,
    ResultObject,
    Settings,
)
from node.spool import Spool
from node.stow import stow_files
from node.version import software_version
from node.vocabulary import (
    COMPREHENSIVE_3D_SR,
    MAMMOGRAPHY_CAD_SR,
    SEGMENTATION,
    is_final_store_failure,
    store_status_meaning,
)
from pipelines.attribution import domain_caveat
from pipelines.cad_sr import build_cad_sr
from pipelines.findings import Finding, find_findings
from pipelines.overlay import build_overlay
from pipelines.quality import (
    DEFAULT_LOW_CONTRAST_FRACTION,
    Domain,
    domain_flags,
    domain_reasons,
    entry_flags,
    merge_flags,
    outside_reason,
)
from pipelines.results import SCREENING_VIEWS, ModelIdentity, OutputSpec, StudyResult, ViewScore
from pipelines.seg import build_binary_seg, build_seg
from pipelines.shadow import Shadow
from pipelines.sr import build_sr
from pipelines.study import LoadedView, Skipped, decode_view, predict_views, select_views

log = get_logger("pipelines.scoring")

OUTPUTS_DIR = "outputs"
TEST_PAUSE_ENV = "MAMMO_NODE_TEST_PAUSE_BEFORE_INFERENCE_S"
# Fault tests: a pause after the results were sent and before the record, to kill a worker
# whose PACS already has them (tests/faults/test_worker_faults.py).
TEST_PAUSE_AFTER_SEND_ENV = "MAMMO_NODE_TEST_PAUSE_AFTER_SEND_S"


class Predictor(Protocol):
    """What the scoring needs of a model runner (pipelines.model.ModelRunner provides it)."""

    identity: ModelIdentity
    last_timings_s: dict[str, float]

    def predict(self, images: list[np.ndarray]) -> list[Any]: ...


@dataclass
class _Progress:
    """What a run has produced so far. Kept when a later step fails, so the record shows how far
    it got (the inputs of a study that failed to decode, the outputs of one that failed to send)."""

    timings_s: dict[str, float]
    inputs: tuple[InputDescription, ...] | None = None
    scores: Scores | None = None
    missing_views: tuple[str, ...] | None = None
    outputs: tuple[OutputFile, ...] | None = None
    sends: tuple[SendResult, ...] | None = None
    not_scored: str | None = None
    not_sent: str | None = None
    undecodable: list[Skipped] = field(default_factory=list)
    views: list[LoadedView] = field(default_factory=list)  # scored by the live model


def _load_views(run_dir: Path, manifest: Sequence[InstanceEntry],
                low_contrast_fraction: float = DEFAULT_LOW_CONTRAST_FRACTION
                ) -> tuple[list[LoadedView], list[Skipped], list[Skipped]]:
    """The decoded views; the instances skipped (all of them); those skipped as undecodable."""
    selected, skipped = select_views(run_dir, manifest)
    loaded, undecodable = [], []
    for view in selected:
        try:
            loaded.append(decode_view(view, low_contrast_fraction))
        except InputError as error:
            undecodable.append(Skipped(view.entry.sop_uid, f"not_decoded:{error}"))
            log.warning("view_not_decoded", sop_uid=view.entry.sop_uid, view=view.entry.view_key,
                        reason=str(error)[:200])
    return loaded, skipped + undecodable, undecodable


def score_views(
    views: list[LoadedView], predictor: Predictor, study_uid: str
) -> tuple[StudyResult, list[np.ndarray]]:
    """Per-view probability and heatmap on the source grid; breast = max of views, exam = max."""
    predictions = predict_views(predictor, views)  # views' type and pixel size when needed
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
    outside_domain: Mapping[str, Sequence[str]] | None = None,
    earlier_reports: Mapping[str, Sequence[Dataset]] | None = None,
) -> tuple[OutputFile, ...]:
    """Build the SR, the SEGs (and the opt-in overlays) of the scored images; files under
    out_dir, described for the record. `outside_domain` (SOP Instance UID -> outside_domain
    flags) is said in both SRs' text, the SEGs' series descriptions and the overlays.
    `earlier_reports` (kind "sr" / "cad_sr" -> headers, from `earlier_reports`): the reports
    of the runs this one supersedes, listed in this run's as their predecessor documents."""
    out_dir.mkdir(exist_ok=True)
    outputs: list[OutputFile] = []
    cfg = settings.outputs

    def _save(kind: Literal["sr", "cad_sr", "seg", "sc"], name: str, dataset: Dataset) -> None:
        path = out_dir / name
        dataset.save_as(path, enforce_file_format=True)
        outputs.append(OutputFile(kind=kind, file=f"{OUTPUTS_DIR}/{name}",
                                  sop_uid=str(dataset.SOPInstanceUID),
                                  series_uid=str(dataset.SeriesInstanceUID)))

    headers = [v.header for v in views]
    reasons = {uid: list(domain_reasons(flags))
               for uid, flags in (outside_domain or {}).items()}
    # One definition of the findings for every object that shows them (pipelines/findings.py).
    findings = [find_findings(heatmap, identity.operating_point) for heatmap in heatmaps]
    segs: list[Dataset] = []
    wanted = wanted_objects(settings)
    for kind, name, dataset in _heatmap_objects(settings, views, heatmaps, findings, identity,
                                                reasons):
        if kind not in wanted:
            continue
        _save(kind, name, dataset)
        if kind == "seg":
            segs.append(dataset)
    if cfg.sr.enabled and "sr" in wanted:
        spec = OutputSpec(cfg.sr.series_number, cfg.sr.series_description, cfg.uid_root)
        # The SR lists the run's SEGs as evidence, so a viewer can go from the scores to the maps.
        by_uid = [v.entry.sop_uid for v in views]
        _save("sr", "sr.dcm", build_sr(
            headers, result, identity, spec, heatmaps=dict(zip(by_uid, heatmaps, strict=True)),
            findings=dict(zip(by_uid, findings, strict=True)), seg_refs=segs,
            outside_domain=reasons, previous_versions=(earlier_reports or {}).get("sr", ())))
    if cfg.cad_sr.enabled and "cad_sr" in wanted:
        spec = OutputSpec(cfg.cad_sr.series_number, cfg.cad_sr.series_description, cfg.uid_root,
                          software_version=software_version())
        _save("cad_sr", "cad-sr.dcm",
              build_cad_sr(headers, result, findings, identity, spec, reasons,
                           (earlier_reports or {}).get("cad_sr", ())))
    return tuple(outputs)


def wanted_objects(settings: Settings) -> frozenset[str]:
    """The kinds of result object some destination gets (all of them when none is configured,
    so a node without destinations still writes its results)."""
    kinds = frozenset(get_args(ResultObject))
    peers = settings.all_destinations
    if not peers:
        return kinds
    return frozenset(kind for kind in kinds if any(d.wants(kind) for d in peers))


def _heatmap_objects(
    settings: Settings, views: list[LoadedView], heatmaps: list[np.ndarray],
    findings: list[tuple[Finding, ...]], identity: ModelIdentity,
    outside_domain: Mapping[str, Sequence[str]],
) -> list[tuple[Literal["seg", "sc"], str, Dataset]]:
    """The SEGs (`outputs.seg.kind`: binary, fractional or both) and the Secondary Capture
    overlays (`outputs.sc.enabled`) of the scored images, with their file names; each names its
    view and says when it is outside the model's domain (`outside_domain`: SOP Instance UID ->
    reasons)."""
    cfg = settings.outputs
    objects: list[tuple[Literal["seg", "sc"], str, Dataset]] = []
    wanted = wanted_objects(settings)  # what no destination gets is not even built
    write_segs = cfg.seg.enabled and "seg" in wanted
    version = software_version()
    regions = OutputSpec(cfg.seg.series_number, cfg.seg.series_description, cfg.uid_root,
                         software_version=version)
    maps = OutputSpec(cfg.seg.fractional_series_number, cfg.seg.fractional_series_description,
                      cfg.uid_root, software_version=version)
    overlay = OutputSpec(cfg.sc.series_number, cfg.sc.series_description, cfg.uid_root,
                         software_version=version)
    for index, (view, heatmap, found) in enumerate(zip(views, heatmaps, findings, strict=True)):
        stem = f"{index + 1}-{view.entry.view_key}"
        reasons = outside_domain.get(view.entry.sop_uid, ())
        if write_segs and cfg.seg.kind in ("binary", "both"):
            objects.append(("seg", f"seg-{stem}.dcm", build_binary_seg(
                view.header, found, identity, regions, view.entry.view_key, reasons)))
        if write_segs and cfg.seg.kind in ("fractional", "both"):
            objects.append(("seg", f"seg-map-{stem}.dcm", build_seg(
                view.header, heatmap, identity, maps, view.entry.view_key, reasons)))
        if cfg.sc.enabled and "sc" in wanted:
            # The worker's pixels are in the model's orientation; the flips are their own inverse.
            pixels = view.orientation.apply(view.pixels)
            objects.append(("sc", f"sc-{stem}.dcm", build_overlay(
                view.header, pixels, heatmap, found, identity, overlay, cfg.sc.max_side_px,
                domain_caveat(view.entry.view_key, reasons) if reasons else None)))
    return objects


def send_outputs(settings: Settings, files: list[Path], kinds: Sequence[str] | None = None,
                 stored_earlier: Mapping[tuple[str, str], str | None] | None = None,
                 journal: Path | None = None, stop: Callable[[], str | None] | None = None
                 ) -> tuple[list[dict[str, Any]], str | None]:
    """Send to every destination with retries and backoff; (per-object log, failure reason).

    `kinds` (aligned with `files`, `node.runs.OutputFile.kind`) lets each destination get only
    the objects it asks for (`destinations[].objects`); without them every file goes everywhere.
    Each log item has the fields of `node.runs.SendResult`.

    Destinations are served side by side, one thread each: a research archive that is down (its
    retries, its timeouts: minutes with the defaults) does not hold back the clinical PACS. The
    per-object log and the reasons keep the configured order.

    `stored_earlier` ((destination, SOP Instance UID) -> status): what an earlier attempt of the
    run stored (one that died mid-send, or a `runs retry` after a send failure); those objects
    are not sent again and are logged with `earlier` and that attempt's status.

    `journal`: the run folder whose send journal (node/runs.py `sent.jsonl`) gets each object
    as its destination confirms it, so that the next attempt knows it when this one dies.

    `stop`: asked before each retry; when it gives a reason (the run was superseded meanwhile),
    the objects not stored yet are held back: not sent, not logged, not a failure.
    """
    jobs = [(destination, list(files) if kinds is None else [
        f for f, kind in zip(files, kinds, strict=True) if destination.wants(kind)])
        for destination in settings.all_destinations]
    earlier = dict(stored_earlier or {})
    if len(jobs) <= 1:
        results = [_send_to_destination(settings, destination, mine, earlier, journal, stop)
                   for destination, mine in jobs]
    else:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="send") as pool:
            # Each thread logs with the run's bound context (structlog's contextvars).
            futures = [pool.submit(contextvars.copy_context().run, _send_to_destination,
                                   settings, destination, mine, earlier, journal, stop)
                       for destination, mine in jobs]
            results = [future.result() for future in futures]
    sends = [item for destination_sends, _ in results for item in destination_sends]
    failures = [reason for _, destination_failures in results for reason in destination_failures]
    return sends, ("; ".join(failures) or None)


def _send_to_destination(settings: Settings, destination: Destination | DicomWebDestination,
                         mine: list[Path], earlier: Mapping[tuple[str, str], str | None],
                         journal: Path | None = None, stop: Callable[[], str | None] | None = None
                         ) -> tuple[list[dict[str, Any]], list[str]]:
    """Send `mine` to one destination with retries and backoff, but those `earlier` says an
    earlier attempt stored there, until `stop` gives a reason; (per-object log, reasons)."""
    note = None if journal is None else _journal_writer(journal, destination.name)
    sends: list[dict[str, Any]] = []
    failures: list[str] = []
    uids = {p: _sop_uid(p) for p in mine} if earlier else {}
    done_before = {p for p in mine if (destination.name, uids.get(p, "")) in earlier}
    if done_before:
        log.info("send_skipped_stored_earlier", destination=destination.name,
                 objects=len(done_before))
    pending = [p for p in mine if p not in done_before]
    outcomes: dict[Path, SendOutcome] = {}
    held_back: set[Path] = set()
    for attempt in range(1, settings.send.attempts + 1):
        why = stop() if stop is not None and attempt > 1 else None
        if why:
            held_back = set(pending)
            log.info("send_held_back", destination=destination.name, objects=len(pending),
                     reason=why)
            break
        try:
            if isinstance(destination, DicomWebDestination):
                results = stow_files(destination, pending, note)
            else:
                results = send_files(settings, destination, pending, note)
        except Exception as error:  # an unexpected SCU failure is one failed attempt
            log.warning("send_attempt_failed", destination=destination.name,
                        reason=type(error).__name__, attempt=attempt)
            # Our own configuration errors say what to fix; anything else by its kind only.
            why = str(error) if isinstance(error, ConfigError) else type(error).__name__
            results = [SendOutcome(_sop_uid(p), None, unanswered=f"the sender failed: {why}")
                       for p in pending]
        for path, outcome in zip(pending, results, strict=True):
            outcomes[path] = outcome
        # An object the destination failed with a status about the object itself (it does
        # not match its SOP class, cannot be understood) gets the same answer again: it is
        # not sent again.
        pending = [p for p in pending
                   if not outcomes[p].ok and not is_final_store_failure(outcomes[p].status)]
        # Objects the destination refused (no presentation context for them) are offered
        # again only beside objects worth another attempt: alone, they would be refused again.
        if all(outcomes[p].refused for p in pending):
            break
        if attempt < settings.send.attempts:
            delay_s = min(settings.send.backoff_max_s, settings.send.backoff_s * 2 ** (attempt - 1))
            log.warning("send_retry_scheduled", destination=destination.name,
                        pending=len(pending), attempt=attempt, retry_in_s=delay_s,
                        reason="; ".join(sorted({_status_words(outcomes[p])
                                                 for p in pending})))
            time.sleep(delay_s)
    pending = [p for p in pending if p not in held_back]
    for path in mine:
        if path in held_back:
            continue
        if path in done_before:
            sends.append({"destination": destination.name, "file": path.name,
                          "sop_uid": uids[path], "status": earlier[(destination.name, uids[path])],
                          "ok": True, "earlier": True})
            continue
        outcome = outcomes[path]
        status = None if outcome.status is None else f"0x{outcome.status:04X}"
        sends.append({"destination": destination.name, "file": path.name,
                      "sop_uid": outcome.sop_uid, "status": status, "ok": outcome.ok,
                      **({"refused": outcome.refused} if outcome.refused else {})})
    final = [p for p in outcomes if is_final_store_failure(outcomes[p].status)]
    if final:
        statuses = sorted({_status_words(outcomes[p]) for p in final})
        failures.append(f"{destination.name}: {len(final)} object(s) failed with a status "
                        f"about the object itself (status {', '.join(statuses)}), not sent "
                        "again: the destination's log says what it objects to")
    unstored = [p for p in pending if not outcomes[p].refused]
    if unstored:
        statuses = sorted({_status_words(outcomes[p]) for p in unstored})
        failures.append(f"{destination.name}: {len(unstored)} object(s) not stored after "
                        f"{settings.send.attempts} attempts (status {', '.join(statuses)})")
    refused = [outcomes[p] for p in pending if outcomes[p].refused]
    for reason in dict.fromkeys(o.refused for o in refused):
        count = sum(o.refused == reason for o in refused)
        failures.append(f"{destination.name}: {count} object(s) refused by the destination "
                        f"({reason}): have its PACS accept them, or leave them out with "
                        "its `objects` setting")
    return sends, failures


def _journal_writer(run_dir: Path, destination: str) -> Callable[[SendOutcome], None]:
    """Each stored object into the run's send journal. A journal that cannot be written (a
    full disk) costs only a second copy if this attempt dies: the send goes on, with one
    warning per destination."""
    warned = False

    def note(outcome: SendOutcome) -> None:
        nonlocal warned
        try:
            append_sent(run_dir, destination, outcome.sop_uid, f"0x{outcome.status:04X}"
                        if outcome.status is not None else None)
        except OSError as error:
            if not warned:
                warned = True
                log.warning("send_journal_not_written", destination=destination,
                            reason=error.strerror or type(error).__name__)
    return note


def _status_words(outcome: SendOutcome) -> str:
    """An unstored object's last answer for the failure reason: its status, or "None" and why
    none came when the association says."""
    if outcome.status is not None:
        meaning = store_status_meaning(outcome.status)
        return f"0x{outcome.status:04X}" + (f" {meaning}" if meaning else "")
    return "None" if outcome.unanswered is None else f"None: {outcome.unanswered}"


def _sop_uid(path: Path) -> str:
    """The SOP Instance UID of a result file, for the record of a send that failed before any
    object was answered ("" when the file cannot be read either)."""
    try:
        return str(dcmread(path, stop_before_pixels=True,
                           specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # unreadable: the send's own failure is what gets reported
        return ""


def process_run(settings: Settings, spool: Spool, run_id: str, predictor: Predictor, *,
                pipeline: str | None = None, shadow: Shadow | None = None,
                leases: Leases | None = None) -> str | None:
    """Score and deliver one run; returns the final state, or None if it was not ours to do.

    `settings` are the pipeline's (`Settings.for_pipeline`); a run of another pipeline (`pipeline`
    None: the implicit one) is left in queued/ untouched. `shadow`: the pipeline's shadow bundle,
    whose scores go into the record beside the live ones and nowhere else.

    With `claims.mode: redis` the run is held under a lease (`leases`, made from `settings`
    when not given; node/leases.py), checked before each step that writes into the run folder,
    moves the run or sends: a worker that lost it (cut off, stalled) leaves everything to the
    worker that holds it now and returns None.
    """
    mine = None if pipeline in (None, "", IMPLICIT_PIPELINE) else pipeline
    queued = spool.run_info(run_id)
    if queued is not None and queued.pipeline != mine:
        log.warning("run_of_another_pipeline", run_id=run_id, run_pipeline=queued.pipeline,
                    worker_pipeline=mine)
        return None
    own_leases = leases is None
    if own_leases:
        leases = Leases.from_settings(settings)
    try:
        with hold_claimed_run(spool, run_id, leases) as held:
            if held is None:
                log.info("run_skipped_duplicate_delivery", run_id=run_id)
                return None
            run_dir, lease = held
            try:
                audit = open_audit(settings, "worker")
                superseded = read_superseded(run_dir)
                info = read_run_info(run_dir)
                if info is None:
                    raise FileNotFoundError(f"run {run_id}: run.json is missing or unreadable")
                if superseded is not None:
                    return _skip_superseded(spool, info, run_dir, superseded.superseded_by, lease)
                return _process_held_run(settings, spool, info, run_dir, predictor, audit,
                                         shadow, lease)
            except LeaseLost as error:
                # Another worker has (or will have) the run: nothing of this attempt is kept.
                log.warning("run_lease_lost", run_id=run_id, reason=str(error))
                return None
    finally:
        if own_leases and leases is not None:
            leases.close()


def _fence(lease: Lease | None, step: str) -> None:
    """Before a step that writes into the run folder, moves the run or sends: LeaseLost unless
    this worker still holds the run (always true with local claims: the flock is held)."""
    if lease is not None:
        lease.check(step)


def _skip_superseded(spool: Spool, info: RunInfo, run_dir: Path, superseded_by: str,
                     lease: Lease | None = None) -> str:
    """A later run of the study took over these instances before this attempt started: nothing
    to score. An earlier attempt that got as far as publishing its results (its worker killed
    before the record) keeps them, unsent, with what it stored (`_hold_back`)."""
    outputs = _published_outputs(run_dir)
    record = RunRecord(run_id=info.run_id, study_uid=info.study_uid, state="done",
                       completion_reason=info.completion_reason, superseded_by=superseded_by,
                       outputs=outputs, sends=_earlier_sends(run_dir, outputs),
                       not_scored=None if outputs else f"superseded by run {superseded_by} "
                                                       "before scoring",
                       not_sent=_before_sending(superseded_by) if outputs else None)
    _fence(lease, "record")
    write_record(run_dir, record)
    spool.finish_run(info.run_id, "done")
    log.info("run_superseded", run_id=info.run_id, study_uid=record.study_uid,
             superseded_by=superseded_by)
    return "done"


def _process_held_run(
    settings: Settings, spool: Spool, info: RunInfo, run_dir: Path, predictor: Predictor,
    audit: AuditLog, shadow: Shadow | None = None, lease: Lease | None = None,
) -> str:
    started = time.time()
    attempts = info.attempts + 1
    _fence(lease, "attempt")
    write_run_info(run_dir, info.model_copy(update={"attempts": attempts}))
    manifest = read_manifest(run_dir)  # the one read of this run's manifest
    progress = _Progress(timings_s=_waiting_times(manifest, info, started))
    failure: RunFailure | None
    try:
        if attempts > settings.scoring.max_attempts:
            # Earlier attempts died mid-run (the worker was killed): a poison study must not
            # take the worker down forever.
            failure = attempts_exhausted(attempts - 1)
        else:
            failure = _score_write_send(settings, spool, info, run_dir, manifest, predictor,
                                        progress, audit, lease)
    except LeaseLost:
        raise  # not this worker's run any more: no record, no move
    except InputError as error:
        failure = RunFailure(kind=FailureKind.INPUT, message=str(error))
    except Exception as error:  # a bug must park the run, not lose it
        log.exception("run_crashed", run_id=info.run_id)
        text = f"{type(error).__name__}: {error}"
        failure = RunFailure(kind=FailureKind.INTERNAL,
                             message=text[:500 - len(f"{FailureKind.INTERNAL}: ")])
    shadow_scores = None
    if shadow is not None and progress.views:  # after the live results went out
        shadow_scores = shadow.score(progress.views, info.study_uid, score_views)
    state: Literal["done", "failed"] = "failed" if failure else "done"
    progress.timings_s["total"] = round(time.time() - started, 3)
    record = RunRecord(
        run_id=info.run_id,
        study_uid=info.study_uid,
        state=state,
        completion_reason=info.completion_reason,
        model=ModelRef(name=predictor.identity.name, version=predictor.identity.version),
        attempts=attempts,
        timings_s=progress.timings_s,
        supersedes=info.supersedes or None,
        error=failure,
        not_scored=progress.not_scored,
        not_sent=progress.not_sent,
        inputs=progress.inputs,
        scores=progress.scores,
        missing_views=progress.missing_views,
        outputs=progress.outputs,
        sends=progress.sends,
        pipeline=info.pipeline,
        shadow=shadow_scores,
    )
    _fence(lease, "record")
    write_record(run_dir, record)
    source = metrics.run_source(run_dir, manifest)
    metrics.observe_run(record, source)
    _record_drift(settings, record, source, predictor)
    _fence(lease, "finish")
    spool.finish_run(info.run_id, state)
    reason = str(failure) if failure else None
    if failure:
        audit.record("study_failed", run_id=info.run_id, study_uid=info.study_uid, reason=reason,
                     attempts=attempts)
    log.info(
        "study_processed",
        run_id=info.run_id,
        study_uid=info.study_uid,
        state=state,
        reason=reason,
        views_scored=len(record.scores.views) if record.scores else 0,
        missing_views=list(record.missing_views or ()),
        exam_score=record.scores.exam if record.scores else None,
        outputs=len(record.outputs or ()),
        model_version=predictor.identity.version,
        timings_s=dict(progress.timings_s),
    )
    return state


def _waiting_times(manifest: Sequence[InstanceEntry], info: RunInfo, started: float
                   ) -> dict[str, float]:
    """Seconds from the last instance to the claim (completion) and from the claim to here."""
    waits = {"queue": round(started - info.claimed_at, 3)}
    if manifest:
        waits = {"completion": round(info.claimed_at - max(e.received_at for e in manifest), 3),
                 **waits}
    return waits


def _score_write_send(
    settings: Settings, spool: Spool, info: RunInfo, run_dir: Path, manifest: Sequence[InstanceEntry],
    predictor: Predictor, progress: _Progress, audit: AuditLog, lease: Lease | None = None,
) -> RunFailure | None:
    """The run's work, step by step into `progress`; the send failure, if any (InputError when
    the study cannot be scored)."""
    timings = progress.timings_s
    t0 = time.perf_counter()
    views, skipped, undecodable = _load_views(run_dir, manifest,
                                              settings.quality.low_contrast_fraction)
    timings["decode"] = round(time.perf_counter() - t0, 3)
    skip = settings.scoring.outside_domain == "skip"
    outside = _outside_domain(info.run_id, views, getattr(predictor, "metadata", None), skip)
    withheld: dict[str, tuple[str, ...]] = {}  # view key -> reasons: not scored
    if skip:
        views, skipped, withheld = _withhold(views, skipped, outside)
    progress.inputs = _describe_inputs(manifest, views, skipped, outside)
    if not views:
        reasons = sorted({s.reason for s in skipped}) or ["no instances"]
        if undecodable or not skipped:
            raise InputError("no scorable view: " + "; ".join(reasons)[:400])
        # Only objects we accept but do not score (tomosynthesis, other views, images outside
        # the model's domain under `scoring.outside_domain: skip`): nothing to send, and
        # nothing went wrong.
        progress.not_scored = "no scorable view: " + "; ".join(reasons)[:400]
        progress.outputs, progress.sends, progress.missing_views = (), (), ()
        audit.record("study_not_scored", run_id=info.run_id, study_uid=info.study_uid,
                     reason=progress.not_scored)
        return None
    _test_pause(TEST_PAUSE_ENV, "test_pause_before_inference", info.run_id)
    result, heatmaps = score_views(views, predictor, info.study_uid)
    if withheld:  # received, not scored: said in the reports, not "not available"
        result = replace(result, not_scored=tuple(
            (key, withheld[key]) for key in SCREENING_VIEWS if key in withheld),
            missing_views=tuple(k for k in result.missing_views if k not in withheld))
    progress.views = views
    for key, value in predictor.last_timings_s.items():
        timings[key] = round(value, 3)
    progress.scores = Scores(
        views={s.view_key: round(s.probability, 6) for s in result.views},
        breasts={k: round(v, 6) for k, v in result.breast_scores.items()},
        exam=round(result.exam_score, 6),
        operating_point=predictor.identity.operating_point,
        suspicious=result.exam_score >= predictor.identity.operating_point,
        operating_point_name=predictor.identity.operating_point_name,
    )
    progress.missing_views = result.missing_views
    audit.record("study_scored", run_id=info.run_id, study_uid=info.study_uid,
                 views_scored=len(result.views), exam_score=progress.scores.exam,
                 model=predictor.identity.name, model_version=predictor.identity.version)
    t0 = time.perf_counter()
    # This attempt's own folder, published whole by one rename: two attempts never mix files.
    attempt_dir = run_dir / f"{OUTPUTS_DIR}.attempt-{uuid.uuid4().hex[:12]}"
    try:
        outputs = write_outputs(settings, views, result, heatmaps, predictor.identity,
                                attempt_dir, outside, earlier_reports(spool, info))
        _fence(lease, "publish")
        _publish_outputs(attempt_dir, run_dir / OUTPUTS_DIR)
    except BaseException:
        shutil.rmtree(attempt_dir, ignore_errors=True)
        raise
    progress.outputs = outputs
    timings["write"] = round(time.perf_counter() - t0, 3)
    superseded = read_superseded(run_dir)
    if superseded is not None:
        _hold_back(info, run_dir, progress, superseded.superseded_by, audit)
        return None
    t0 = time.perf_counter()
    _fence(lease, "send")
    overtaken: list[str] = []  # set when a retry finds the run superseded

    def superseded_meanwhile() -> str | None:
        note = read_superseded(run_dir)
        if note is not None and not overtaken:
            overtaken.append(note.superseded_by)
        return f"superseded by run {overtaken[0]}" if overtaken else None

    sends, failure = send_outputs(settings, [run_dir / o.file for o in progress.outputs],
                                  [o.kind for o in progress.outputs], _stored_earlier(run_dir),
                                  journal=run_dir, stop=superseded_meanwhile)
    timings["send"] = round(time.perf_counter() - t0, 3)
    if overtaken:  # a destination was being retried (down) when a later run took over
        _not_sent(info, progress, audit, f"superseded by run {overtaken[0]} while sending: "
                  "what a destination had not stored by then was not sent to it")
    _test_pause(TEST_PAUSE_AFTER_SEND_ENV, "test_pause_after_send", info.run_id)
    progress.sends = tuple(SendResult.model_validate(s) for s in sends)
    _audit_sends(audit, info, progress.sends)
    return RunFailure(kind=FailureKind.SEND, message=failure) if failure else None


def _hold_back(info: RunInfo, run_dir: Path, progress: _Progress, superseded_by: str,
               audit: AuditLog) -> None:
    """A later run of the study (an image that arrived while this one was scored) took these
    images over: its report covers them all and is the one to read. This run's results stay in
    its folder, unsent; sent now, they would reach the PACS after the later report and say
    nothing of it. What an earlier attempt of this run already stored is kept in the record
    (`earlier`), so the later run's reports can name it as their predecessor."""
    progress.sends = _earlier_sends(run_dir, progress.outputs or ())
    _not_sent(info, progress, audit, _before_sending(superseded_by))


def _before_sending(superseded_by: str) -> str:
    return f"superseded by run {superseded_by} before sending"


def _not_sent(info: RunInfo, progress: _Progress, audit: AuditLog, why: str) -> None:
    """A run whose results (or some of them) are held back: why, in its record, log and audit."""
    progress.not_sent = why
    log.info("results_not_sent", run_id=info.run_id, study_uid=info.study_uid, reason=why)
    audit.record("results_not_sent", run_id=info.run_id, study_uid=info.study_uid, reason=why)


def _test_pause(env: str, event: str, run_id: str) -> None:
    """The fault tests' pause at one step (seconds in `env`; none when unset): room to kill a
    worker there deterministically. Logged, so a pause left on in production is seen."""
    pause_s = float(os.environ.get(env, "0") or 0)
    if pause_s > 0:
        log.warning(event, run_id=run_id, pause_s=pause_s)
        time.sleep(pause_s)


# The kinds of result object that are reports, and their SOP classes.
_REPORT_CLASSES: dict[Literal["sr", "cad_sr"], str] = {
    "sr": COMPREHENSIVE_3D_SR, "cad_sr": MAMMOGRAPHY_CAD_SR}


def earlier_reports(spool: Spool, info: RunInfo) -> dict[str, list[Dataset]]:
    """Kind ("sr", "cad_sr") -> headers of the reports of the runs this one supersedes that
    reached a destination: this run's reports replace them, and say so. From a finished run's
    record (its outputs and sends); from a run still sending, its send journal and its
    published outputs. A run superseded before it sent sends nothing (`_hold_back`); one
    already purged has no folder, and a report a run still sending stores after this one
    was written is not listed."""
    found: dict[str, list[Dataset]] = {kind: [] for kind in _REPORT_CLASSES}
    for run_id in info.supersedes:
        located = spool.locate(run_id)
        if located is None:
            continue
        for kind, header in _reports_stored(located[1], info.study_uid):
            found[kind].append(header)
    return found


def _reports_stored(run_dir: Path, study_uid: str) -> list[tuple[str, Dataset]]:
    """(kind, header) of each report of a run that some destination stored."""
    record = read_record(run_dir)
    if record is not None:
        stored = {s.sop_uid for s in record.sends or () if s.ok}
        outputs = record.outputs or ()
    else:  # still sending: what its journal says a destination has stored so far
        stored = {uid for _, uid in read_sent(run_dir)}
        outputs = _published_outputs(run_dir) if stored else ()
    found: list[tuple[str, Dataset]] = []
    for output in outputs:
        if output.kind in _REPORT_CLASSES and output.sop_uid in stored:
            header = Dataset()
            header.SOPClassUID = _REPORT_CLASSES[output.kind]
            header.SOPInstanceUID = output.sop_uid
            header.StudyInstanceUID = study_uid
            header.SeriesInstanceUID = output.series_uid
            found.append((output.kind, header))
    return found


def _published_outputs(run_dir: Path) -> tuple[OutputFile, ...]:
    """The results an attempt of the run published (`outputs/`), described from their files:
    for a run whose record is not written yet (still sending, or its worker killed)."""
    kinds: dict[str, Literal["sr", "cad_sr", "seg"]] = {
        **{sop_class: kind for kind, sop_class in _REPORT_CLASSES.items()}, SEGMENTATION: "seg"}
    found = []
    for path in sorted((run_dir / OUTPUTS_DIR).glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"])
            found.append(OutputFile(kind=kinds.get(str(ds.SOPClassUID), "sc"),
                                    file=f"{OUTPUTS_DIR}/{path.name}",
                                    sop_uid=str(ds.SOPInstanceUID),
                                    series_uid=str(ds.SeriesInstanceUID)))
        except (OSError, InvalidDicomError, AttributeError):
            continue  # purged under us, or not one of ours
    return tuple(found)


def _earlier_sends(run_dir: Path, outputs: Sequence[OutputFile]) -> tuple[SendResult, ...]:
    """What earlier attempts of the run stored (its send journal, a retried run's previous
    record), as sends marked `earlier`: the record of a run that ends without sending."""
    stored = _stored_earlier(run_dir)
    return tuple(SendResult(destination=destination, file=Path(output.file).name,
                            sop_uid=output.sop_uid, status=status, ok=True, earlier=True)
                 for output in outputs for (destination, uid), status in stored.items()
                 if uid == output.sop_uid)


def _stored_earlier(run_dir: Path) -> dict[tuple[str, str], str | None]:
    """(destination, SOP Instance UID) -> status of each object an earlier attempt of this run
    stored: a PACS that stored the results before the worker died, or before the research
    archive failed the run, does not get them again (some PACS answer a second copy with a
    failure). From the run's send journal, and from the record a `runs retry` of a failed run
    set aside (runs failed before the journal existed). A retried run that had succeeded sends
    everything again (its operator wants it resent: a PACS restored from backup): the retry
    cleared its journal. The result UIDs derive from the study, the images and the model, so an
    object of another model (a bundle swapped between the attempts) is never taken for one
    already stored."""
    stored: dict[tuple[str, str], str | None] = {}
    previous = read_record(run_dir, PREVIOUS_RECORD_NAME)
    if previous is not None and previous.state == "failed":
        stored.update({(s.destination, s.sop_uid): s.status for s in previous.sends or ()
                       if s.ok})
    stored.update(read_sent(run_dir))
    return stored


def _publish_outputs(attempt_dir: Path, outputs_dir: Path) -> None:
    """Make an attempt's folder the run's outputs/ by rename. Outputs an earlier attempt of the
    run published (it died or lost its lease before the record) are replaced: the same objects,
    since result UIDs derive from the study, the images and the model (node/uids.py)."""
    if outputs_dir.exists():
        replaced = attempt_dir.with_name(f"{attempt_dir.name}.replaced")
        os.rename(outputs_dir, replaced)
        shutil.rmtree(replaced, ignore_errors=True)
    os.rename(attempt_dir, outputs_dir)


def _audit_sends(audit: AuditLog, info: RunInfo, sends: Sequence[SendResult]) -> None:
    """One audit event per destination: everything stored, or what was not."""
    for destination in dict.fromkeys(s.destination for s in sends):
        mine = [s for s in sends if s.destination == destination]
        failed = [s for s in mine if not s.ok]
        fields: dict[str, Any] = {"run_id": info.run_id, "study_uid": info.study_uid,
                                  "destination": destination, "objects": len(mine),
                                  "sop_uids": [s.sop_uid for s in mine]}
        earlier = sum(s.earlier for s in mine)
        if earlier:
            fields["stored_earlier"] = earlier  # by an earlier attempt of the run
        if failed:
            refused = sorted({s.refused for s in failed if s.refused})
            audit.record("results_send_failed", **fields, not_stored=len(failed),
                         statuses=sorted({str(s.status) for s in failed}),
                         **({"refused": refused} if refused else {}))
        else:
            audit.record("results_sent", **fields)


def _outside_domain(run_id: str, views: list[LoadedView], metadata: object, skip: bool = False
                    ) -> dict[str, tuple[str, ...]]:
    """Each decoded view outside the live bundle's declared domain: its `outside_domain:` flags,
    and one `input_outside_domain` warning (run, view, reasons, and whether it is scored:
    `scoring.outside_domain`; no PHI)."""
    domain = Domain.from_metadata(metadata if isinstance(metadata, Mapping) else None)
    flags = {v.entry.sop_uid: domain_flags(v.header, domain) for v in views}
    for view in views:
        if flags[view.entry.sop_uid]:
            log.warning("input_outside_domain", run_id=run_id, sop_uid=view.entry.sop_uid,
                        view=view.entry.view_key,
                        reasons=list(domain_reasons(flags[view.entry.sop_uid])),
                        scored=not skip)
    return {uid: found for uid, found in flags.items() if found}


def _withhold(views: list[LoadedView], skipped: list[Skipped],
              outside: Mapping[str, tuple[str, ...]]
              ) -> tuple[list[LoadedView], list[Skipped], dict[str, tuple[str, ...]]]:
    """`scoring.outside_domain: skip`: the views inside the domain; the skipped instances with
    those outside it added (reason `outside_domain:<reasons>`); view key -> reasons of those."""
    out = [v for v in views if v.entry.sop_uid in outside]
    withheld = {v.entry.view_key: domain_reasons(outside[v.entry.sop_uid]) for v in out}
    return ([v for v in views if v.entry.sop_uid not in outside],
            skipped + [Skipped(v.entry.sop_uid, outside_reason(outside[v.entry.sop_uid]))
                       for v in out], withheld)


def _describe_inputs(manifest: Sequence[InstanceEntry], views: list[LoadedView],
                     skipped: list[Skipped], outside: Mapping[str, tuple[str, ...]] | None = None
                     ) -> tuple[InputDescription, ...]:
    reasons = {s.sop_uid: s.reason for s in skipped}
    scored = {v.entry.sop_uid for v in views}
    decoded = {v.entry.sop_uid: v.quality_flags for v in views}
    outside = outside or {}
    return tuple(InputDescription.of(
        entry, scored=entry.sop_uid in scored, reason=reasons.get(entry.sop_uid),
        quality_flags=merge_flags(entry_flags(entry), decoded.get(entry.sop_uid, ()),
                                  outside.get(entry.sop_uid, ())))
        for entry in manifest)


def _record_drift(settings: Settings, record: RunRecord, source: metrics.RunSource,
                  predictor: Predictor) -> None:
    """A scored exam into its source's drift window (node/drift.py), with the bundle's reference
    (`reference_scores` of its metadata, with its operating points). Monitoring: a failure is
    logged, never the run's."""
    if record.scores is None or record.model is None:
        return
    metadata = getattr(predictor, "metadata", None)
    reference = reference_for_store(metadata) if isinstance(metadata, Mapping) else None
    key = SourceKey(record.model.name, record.model.version, source.calling_ae,
                    source.manufacturer)
    entry = ExamEntry(at=time.time(), run_id=record.run_id, exam=record.scores.exam,
                      images=tuple(record.scores.views.values()))
    try:
        DriftStore(settings.spool.dir, settings.drift.window, settings.drift.max_sources).record(
            key, entry, reference)
    except OSError as error:
        log.warning("drift_not_recorded", run_id=record.run_id, reason=error.strerror)

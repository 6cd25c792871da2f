"""`mammo-node`: serve, worker, config check, echo, selftest, runs, export-training.

Exit codes: 0 success, 1 the operation failed (peer unreachable, run not found, run in a state
that does not allow it), 2 bad usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from node.audit import open_audit
from node.config_check import (
    offline_problems,
    operating_point_notes,
    pipeline_problems,
    tls_problems,
)
from node.errors import ConfigError, ModelError, TransientError
from node.logs import configure_logging, get_logger
from node.runs import read_record, read_run_info, read_superseded
from node.settings import DicomWebDestination, Settings, load_settings
from node.spool import RUN_STATES, RunState, RunStateError, Spool
from node.version import software_version

log = get_logger("node.cli")


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None


def _check_tls_files(settings: Settings) -> None:
    """Load every configured certificate and key now, so a bad file stops start-up, not a handshake."""
    problems = tls_problems(settings)
    if problems:
        raise ConfigError("\n".join(problems))


def cmd_config_check(args: argparse.Namespace) -> int:
    """The schema, then what can be checked offline (node/config_check.py); exit 2 on any problem."""
    try:
        settings = load_settings(args.file)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    problems = pipeline_problems(settings) if args.schema_only else offline_problems(settings)
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return 2
    if settings.pipelines:
        print(f"{args.file}: ok ({len(settings.pipelines)} pipeline(s): "
              + ", ".join(f"{p.name} = ae_title {p.ae_title}" for p in settings.pipeline_list)
              + f"; {len(settings.all_destinations)} destination(s))")
    else:
        print(f"{args.file}: ok (ae_title {settings.node.ae_title}, "
              f"{len(settings.allowed_callers)} allowed caller(s), "
              f"{len(settings.destinations)} destination(s))")
    if not args.schema_only:
        for note in operating_point_notes(settings):
            print(f"{args.file}: {note}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import NodeService

    settings = _load(args.config)
    configure_logging(args.log_level)
    stop = threading.Event()
    # The handler only sets an event: shutting pynetdicom down from a signal handler deadlocks.
    # Installed before the listener opens: a SIGTERM that arrives while the node starts (the
    # port already answering) still stops it cleanly once it has started.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _check_tls_files(settings)
        if pipeline_problems(settings):
            raise ConfigError("\n".join(pipeline_problems(settings)))
        service = NodeService(settings)
        service.start()
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    except OSError as error:
        log.error("node_start_failed", reason=error.strerror or str(error),
                  port=settings.node.port)
        return 1
    while not stop.wait(1.0):
        pass
    service.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    config = _load(args.config)
    configure_logging(args.log_level)
    pipeline = config.pipeline(args.pipeline)
    if pipeline is None:
        known = ", ".join(p.name for p in config.pipeline_list)
        print(f"--pipeline NAME is needed: the config has pipelines {known}"
              if args.pipeline is None else
              f"unknown pipeline {args.pipeline!r} (configured: {known})", file=sys.stderr)
        return 2
    try:
        config = _worker_overrides(config, args)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    threads = config.worker.thread_count
    if threads > 1 and args.concurrency > 1:
        print(f"--concurrency {args.concurrency} with worker.threads {threads}: a worker with "
              "threads is one process; start one `mammo-node worker` per process instead",
              file=sys.stderr)
        return 2
    # The pipeline's model, shadow and destinations in the top-level places.
    settings = config.for_pipeline(pipeline.name)
    # A prefork worker loads the bundle in a throwaway process first: a missing or mismatched
    # bundle stops the worker here with one clear line, and no torch thread pool exists before
    # Celery forks. It runs while this process imports Celery and the pipelines. A threads pool
    # loads the bundle in this process (below), and that load is the check.
    # Its messages go to a file (a pipe left unread while this process imports would fill).
    check_output = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the check
    check = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pipelines.model import load_bundle; from node.errors import ModelError\n"
         "try:\n  load_bundle(sys.argv[1], sys.argv[2], sys.argv[3])\n"
         "except ModelError as e:\n  print(e, file=sys.stderr); sys.exit(2)",
         str(settings.model.bundle_dir), settings.model.device, settings.model.operating_point],
        stdout=subprocess.DEVNULL, stderr=check_output,
    ) if threads <= 1 else None
    try:
        os.environ["MAMMO_NODE_CONFIG"] = str(Path(args.config).resolve())
        os.environ["MAMMO_NODE_LOG_LEVEL"] = args.log_level
        named = None if pipeline.implicit else pipeline.name
        if named is None:
            os.environ.pop("MAMMO_NODE_PIPELINE", None)
        else:
            os.environ["MAMMO_NODE_PIPELINE"] = named
        # Before prometheus_client is imported: the pool children's metrics meet in this folder,
        # the endpoint (when configured) serves their sum and the heartbeat says which model
        # they loaded.
        from node.monitoring import WorkerMonitor, prepare_worker_metrics_dir

        metrics_dir = prepare_worker_metrics_dir()
        from pipelines.celery_app import configure, load_in_this_process

        app = configure(config, named)
        reason = _bundle_rejection(check, check_output, load_in_this_process)
    finally:
        if check is not None and check.poll() is None:  # interrupted while it loads
            check.kill()
            check.wait()
        check_output.close()
    if reason is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.error("model_bundle_rejected", bundle_dir=str(settings.model.bundle_dir), reason=reason)
        print(f"model bundle rejected: {reason}", file=sys.stderr)
        return 2
    monitor = WorkerMonitor(settings, metrics_dir)
    try:
        monitor.start()
    except (ConfigError, OSError) as error:
        monitor.stop()
        print(str(error), file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    try:
        app.worker_main([
            "worker",
            f"--loglevel={args.log_level}",
            f"--queues={pipeline.queue}",
            f"--concurrency={threads if threads > 1 else args.concurrency}",
            f"--pool={'threads' if threads > 1 else 'prefork'}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=mammo-worker-{os.getpid()}@%h",
        ])
    finally:
        monitor.stop()
    return 0


def _bundle_rejection(check: subprocess.Popen[bytes] | None, output: IO[bytes],
                      load_here: Callable[[], None]) -> str | None:
    """Why the worker's bundle cannot be used (its ModelError's line), or None: from the
    throwaway process `check`, or, without one (a threads pool), from loading it here."""
    if check is None:
        # A threads pool scores `threads` studies at once in this process through one model
        # (pipelines/batching.py), loaded here: there is no pool child to load it.
        try:
            load_here()
        except ModelError as error:
            return str(error)
        return None
    if check.wait() == 0:
        return None
    output.seek(0)
    lines = output.read().decode("utf-8", "replace").strip().splitlines()
    return (lines or ["unknown error"])[-1]


def _worker_overrides(config: Settings, args: argparse.Namespace) -> Settings:
    """The settings with the worker options of the command line in `worker` (ConfigError when
    a value is out of range)."""
    options = {"threads": args.threads, "batch_views": args.batch_views,
               "batch_wait_ms": args.batch_wait_ms}
    given = {key: value for key, value in options.items() if value is not None}
    if not given:
        return config
    from pydantic import ValidationError

    from node.settings import WorkerSection

    try:
        worker = WorkerSection.model_validate({**config.worker.model_dump(), **given})
    except ValidationError as error:
        problems = "; ".join(f"worker.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in error.errors())
        raise ConfigError(problems) from None
    return config.model_copy(update={"worker": worker})


def cmd_echo(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    configure_logging(args.log_level)
    if args.peer is not None:
        return _say(*_echo_one(settings, args.peer))
    names = [d.name for d in settings.all_destinations]
    if not names:
        print("no destinations configured", file=sys.stderr)
        return 2
    # Every one at once (a dead destination costs its timeout once, not once per name before
    # it), said in the configured order.
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="echo") as pool:
        answers = list(pool.map(lambda name: _echo_one(settings, name), names))
    return max(_say(*answer) for answer in answers)


def _say(code: int, line: str, answered: bool) -> int:
    """Print one destination's echo line (its answer on stdout, whatever it was; stderr when none
    came) and return its exit code."""
    print(line, file=sys.stdout if answered else sys.stderr)
    return code


def _echo_one(settings: Settings, name: str) -> tuple[int, str, bool]:
    """(exit code, the line to print, whether the destination answered) of one echo."""
    from node.scu import echo

    web = [d for d in settings.dicomweb_destinations if d.name == name]
    if web:
        return _echo_web(web[0])
    matches = [d for d in settings.destinations if d.name == name]
    if not matches:
        known = ", ".join(d.name for d in settings.all_destinations) or "none"
        return 2, f"unknown destination {name!r} (configured: {known})", False
    try:
        status = echo(settings, matches[0])
    except TransientError as error:
        return 1, f"C-ECHO {name}: failed: {error}", False
    return (0 if status == 0 else 1,
            f"C-ECHO {name} ({matches[0].ae_title}@{matches[0].host}:{matches[0].port}): "
            f"status 0x{status:04X}", True)


def _echo_web(destination: DicomWebDestination) -> tuple[int, str, bool]:
    """A DICOMweb destination's C-ECHO: a QIDO-RS query with its token (node/stow.py:probe)."""
    from node.stow import probe

    try:
        status = probe(destination)
    except TransientError as error:
        return 1, f"QIDO-RS {destination.name}: failed: {error}", False
    hint = {401: " (the token: its environment variable, or the server's users)",
            403: " (the token is known but not allowed)", 404: " (the URL's DICOMweb root)"}
    where = urlsplit(destination.url)  # user:password@ in a URL stays off the terminal
    shown = f"{where.scheme}://{where.hostname}{f':{where.port}' if where.port else ''}{where.path}"
    return (0 if 200 <= status < 300 else 1,
            f"QIDO-RS {destination.name} ({shown}): HTTP {status}{hint.get(status, '')}", True)


def cmd_selftest(args: argparse.Namespace) -> int:
    """Exit 0 when a synthetic study went through and its results reached the destinations, else 1."""
    from node.selftest import SelftestError, run_selftest

    settings = _load(args.config)
    configure_logging(args.log_level)
    if args.timeout_s <= 0:
        print("--timeout-s must be positive", file=sys.stderr)
        return 2
    # With `pipelines`: through one pipeline's AE title, callers and destinations (default the
    # first); without: the node's AE title, as always.
    pipeline = (settings.pipeline_list[0] if args.pipeline is None
                else settings.pipeline(args.pipeline))
    if pipeline is None:
        print(f"selftest: unknown pipeline {args.pipeline!r}", file=sys.stderr)
        return 2
    if not pipeline.implicit:
        view = settings.for_pipeline(pipeline.name)
        settings = view.model_copy(update={
            "node": view.node.model_copy(update={"ae_title": pipeline.ae_title}),
            "allowed_callers": list(pipeline.allowed_callers)})
    try:
        result = run_selftest(settings, args.destination or (), args.timeout_s, args.calling_ae,
                              pipeline="" if pipeline.implicit else pipeline.name)
    except SelftestError as error:
        print(f"selftest: {error}", file=sys.stderr)
        return 2
    for line in result.lines:
        print(f"selftest: {line}")
    print(f"selftest: {'ok' if result.ok else 'FAILED'}")
    return 0 if result.ok else 1


def _run_summary(spool: Spool, state: RunState, run_id: str) -> dict[str, object]:
    """One line of `runs list`: the claim, overridden by the outcome where the run has one."""
    folder = spool.state_dir(state) / run_id
    found: dict[str, object] = {}
    run = read_run_info(folder)
    if run is not None:
        found.update(study_uid=run.study_uid, completion_reason=run.completion_reason,
                     instance_count=run.instance_count, attempts=run.attempts,
                     supersedes=list(run.supersedes))
    record = read_record(folder)
    if record is not None:
        known = {"study_uid": record.study_uid, "not_scored": record.not_scored,
                 "not_sent": record.not_sent,
                 "attempts": record.attempts,
                 "error": str(record.error) if record.error is not None else None}
        found.update({k: v for k, v in known.items() if v not in (None, "")})
    superseded = read_superseded(folder)
    if superseded is not None:
        found["superseded_by"] = superseded.superseded_by
    info: dict[str, object] = {"run_id": run_id, "state": state}
    info.update({k: v for k, v in found.items() if v not in (None, [], "")})
    if state == "queued":
        info["published"] = spool.published_at(run_id) is not None
    return info


def _existing_spool(settings: Settings, config: str) -> Spool | None:
    """The spool to read, or None (said on stderr) when it does not exist yet."""
    if not settings.spool.dir.is_dir():
        print(f"spool {settings.spool.dir} not found (spool.dir in {config}; "
              "`mammo-node serve` creates it)", file=sys.stderr)
        return None
    return Spool(settings.spool.dir)


def cmd_runs_list(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    spool = _existing_spool(settings, args.config)
    if spool is None:
        return 1
    states: list[RunState] = args.state or list(RUN_STATES)
    for state in states:
        for run_id in spool.runs(state):
            print(json.dumps(_run_summary(spool, state, run_id), sort_keys=True))
    return 0


def cmd_runs_retry(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    configure_logging(args.log_level)
    spool = Spool(settings.spool.dir)
    located = spool.locate(args.run_id)
    if located is None:
        print(f"run {args.run_id!r} not found", file=sys.stderr)
        return 1
    study_uid = _study_uid_of(spool, args.run_id)
    try:
        spool.requeue_run(args.run_id)
    except (RunStateError, FileNotFoundError) as error:
        print(f"cannot retry: {error}", file=sys.stderr)
        return 1
    open_audit(settings, "cli").record("run_retried", run_id=args.run_id, study_uid=study_uid,
                                       from_state=located[0], user=_operator())
    print(f"run {args.run_id}: {located[0]} -> queued (attempts reset; the node publishes it)")
    return 0


def cmd_runs_discard(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    configure_logging(args.log_level)
    spool = Spool(settings.spool.dir)
    study_uid = _study_uid_of(spool, args.run_id)
    # With Redis claims a worker on another host holds the run by its lease, which its flock on
    # a shared filesystem may not show here: discard only holding the lease ourselves.
    from node.leases import Leases
    leases = Leases.from_settings(settings)
    lease = None
    try:
        if leases is not None:
            try:
                lease = leases.acquire(args.run_id)
            except TransientError as error:
                print(f"cannot discard: cannot tell whether a worker holds the run ({error})",
                      file=sys.stderr)
                return 1
            if lease is None:
                print(f"cannot discard: run {args.run_id} is being worked on: try again when it "
                      "is done", file=sys.stderr)
                return 1
        from_state, _ = spool.discard_run(args.run_id, reason=args.reason or "")
    except FileNotFoundError:
        print(f"run {args.run_id!r} not found", file=sys.stderr)
        return 1
    except RunStateError as error:
        print(f"cannot discard: {error}", file=sys.stderr)
        return 1
    finally:
        if lease is not None:
            lease.release()
        if leases is not None:
            leases.close()
    open_audit(settings, "cli").record("run_discarded", run_id=args.run_id, study_uid=study_uid,
                                       from_state=from_state, reason=args.reason or "",
                                       user=_operator())
    print(f"run {args.run_id}: {from_state} -> discarded (purged with the others after "
          f"{settings.spool.retention_days:g} days)")
    return 0


def cmd_runs_purge(args: argparse.Namespace) -> int:
    from node.service import purge_expired

    settings = _load(args.config)
    configure_logging(args.log_level)
    if args.older_than is not None and args.older_than < 0:
        print("--older-than must not be negative", file=sys.stderr)
        return 2
    spool = Spool(settings.spool.dir).ensure()
    purged = purge_expired(settings, spool, open_audit(settings, "cli"),
                           older_than_days=args.older_than)
    for item in purged:
        print(json.dumps(item, sort_keys=True))
    days = settings.spool.retention_days if args.older_than is None else args.older_than
    print(f"{len(purged)} finished run(s) older than {days:g} days purged", file=sys.stderr)
    return 0


STATUS_FAILURES = 5  # the latest failed runs `status` shows


def _latest_failures(spool: Spool, limit: int = STATUS_FAILURES) -> list[dict[str, object]]:
    """The newest runs in failed/ (by when they got there) with their typed reason."""
    folder = spool.state_dir("failed")
    found = []
    for run_id in spool.runs("failed"):
        try:
            found.append((os.stat(folder / run_id).st_mtime, run_id))
        except OSError:
            continue  # retried or purged meanwhile
    failures: list[dict[str, object]] = []
    for failed_at, run_id in sorted(found, reverse=True)[:limit]:
        record = read_record(folder / run_id)
        error = record.error if record is not None else None
        failures.append({"run_id": run_id, "failed_at": failed_at,
                         "error_kind": str(error.kind) if error else "unknown",
                         "error": error.message[:300] if error else "no record"})
    return failures


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def _print_status(report: dict[str, object], config: str) -> None:
    from datetime import UTC, datetime

    runs = report["runs"]
    workers = report["workers"]
    spool = report["spool"]
    checks = report["checks"]
    assert isinstance(runs, dict) and isinstance(workers, list)
    assert isinstance(spool, dict) and isinstance(checks, dict)
    print(f"mammo-node status ({config})")
    print("  runs:     " + ", ".join(f"{state} {count}" for state, count in runs.items())
          + f"; incoming studies {report['incoming_studies']}")
    depth = report["queue_depth"]
    print(f"  queue:    {'unknown' if depth is None else depth} waiting "
          f"(broker: {checks['broker']['detail']})")
    alive = sum(1 for w in workers if w["alive"])
    print(f"  workers:  {alive} alive of {len(workers)} known")
    for worker in workers:
        model = f"{worker['model']} {worker['model_version']}" if worker["model"] else "no model yet"
        port = f", metrics port {worker['port']}" if worker["port"] else ""
        print(f"    {worker['worker']}: {model}, {worker['ready']} process(es) ready, "
              f"last seen {worker['age_s']:.0f} s ago{port}"
              f"{'' if worker['alive'] else ' [SILENT]'}")
    print(f"  disk:     {_bytes(spool['free_bytes'])} free, watermark "
          f"{_bytes(spool['min_free_bytes'])}{'' if spool['writable'] else ', NOT WRITABLE'}")
    failures = report["failures"]
    assert isinstance(failures, list)
    print(f"  failures: {runs.get('failed', 0)} run(s) in failed/"
          + (f", latest {len(failures)}:" if failures else ""))
    for failure in failures:
        when = datetime.fromtimestamp(float(failure["failed_at"]), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"    {failure['run_id']}  {when}  {failure['error_kind']}: {failure['error']}")
    problems = report["problems"]
    assert isinstance(problems, list)
    print("  status:   " + ("ok" if not problems else "PROBLEM: " + "; ".join(problems)))


def cmd_status(args: argparse.Namespace) -> int:
    """Runs, queue, workers (heartbeats), latest failures and disk; exit 1 when something is wrong
    (a check of /readyz fails: no worker alive, disk below watermark, broker away, ...)."""
    from node.monitoring import take_snapshot

    settings = _load(args.config)
    spool = _existing_spool(settings, args.config)
    if spool is None:
        return 1
    snapshot = take_snapshot(settings, spool)
    report = snapshot.as_json()
    report["problems"] = snapshot.problems()
    report["failures"] = _latest_failures(spool)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_status(report, args.config)
    return 1 if snapshot.problems() else 0


def cmd_drift(args: argparse.Namespace) -> int:
    """The score drift of every source against its bundle's reference (node/drift_report.py):
    report.md, drift.json and drift.png in --out; exit 1 when a source shows a significant shift
    (or the spool is missing), 2 for a bad config."""
    from node.drift_report import write_report

    settings = _load(args.config)
    if _existing_spool(settings, args.config) is None:
        return 1
    out = Path(args.out)
    rows = write_report(settings, out)
    for row in rows:
        psi = "–" if row["psi"] is None else f"{row['psi']:.3f}"
        print(f"{row['model']} {row['model_version']}  {row['calling_ae']} / {row['manufacturer']}"
              f"  exams {row['exams']}  PSI {psi}  {row['verdict']}")
    print(f"report: {out / 'report.md'}" + ("" if rows else " (no scored exam yet)"))
    return 1 if any(row["verdict"] == "significant shift" for row in rows) else 0


def cmd_export_training(args: argparse.Namespace) -> int:
    """De-identified training set of the scored studies in done/ (node/deid_export.py)."""
    from node.deid_export import ExportError, export_training_set, load_key, read_outcomes

    settings = _load(args.config)
    configure_logging(args.log_level)
    if args.since is not None and args.since <= 0:
        print("--since must be positive", file=sys.stderr)
        return 2
    if not settings.spool.dir.is_dir():
        print(f"spool {settings.spool.dir} not found (spool.dir in {args.config})", file=sys.stderr)
        return 1
    try:
        key = load_key(args.key_file)
        outcomes = read_outcomes(args.outcomes) if args.outcomes else None
        summary = export_training_set(Spool(settings.spool.dir), args.out, key, outcomes,
                                      args.since)
    except ExportError as error:
        print(f"export-training: {error}", file=sys.stderr)
        return 2
    counts = summary.as_json()
    open_audit(settings, "cli").record("training_set_exported", out=str(args.out.resolve()),
                                       since_days=args.since, user=_operator(), **counts)
    log.info("training_set_exported", **counts)
    print(json.dumps(counts, sort_keys=True))
    print(f"{summary.images_exported} image(s) of {summary.studies_exported} study(ies), "
          f"{summary.patients} patient(s) -> {args.out} ({summary.labelled_images} labelled, "
          f"{summary.unlabelled_images} without outcome)", file=sys.stderr)
    return 0


def cmd_shadow_report(args: argparse.Namespace) -> int:
    """Compare the shadow bundle's scores with the live ones in the finished runs' records; exit
    1 when no run has both, 2 on a bad outcomes CSV or pipeline name."""
    from node.shadow_report import OutcomesError, collect_pairs, compare, format_report, read_outcomes

    settings = _load(args.config)
    if args.pipeline is not None and settings.pipeline(args.pipeline) is None:
        print(f"unknown pipeline {args.pipeline!r}", file=sys.stderr)
        return 2
    try:
        outcomes = read_outcomes(Path(args.outcomes)) if args.outcomes else None
    except OutcomesError as error:
        print(str(error), file=sys.stderr)
        return 2
    if not settings.spool.dir.is_dir():
        print(f"spool {settings.spool.dir} not found (spool.dir in {args.config})",
              file=sys.stderr)
        return 1
    collected = collect_pairs(Spool(settings.spool.dir), args.pipeline)
    reports = compare(collected.pairs, outcomes)
    if args.json:
        print(json.dumps({"comparisons": reports, "shadow_errors": collected.shadow_errors},
                         sort_keys=True))
    else:
        for line in format_report(reports, collected.shadow_errors):
            print(line)
    if not reports:
        print("no finished run has both live and shadow scores (is a shadow_model configured "
              "and a worker of its pipeline running?)", file=sys.stderr)
        return 1
    return 0


def _study_uid_of(spool: Spool, run_id: str) -> str:
    info = spool.run_info(run_id)
    return info.study_uid if info is not None else ""


def _operator() -> str:
    """Who ran the command (the login name; the audit trail wants a person, not a UID)."""
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "") or str(os.getuid())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammo-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mammo-node {software_version()}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="DICOM listener and study completion watcher")
    serve.add_argument("--config", required=True)
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="Celery worker that scores studies")
    worker.add_argument("--config", required=True)
    worker.add_argument("--concurrency", type=int, default=1,
                        help="pool processes, each scoring one study at a time (without "
                             "worker.threads)")
    worker.add_argument("--threads", type=int, default=None, metavar="N",
                        help="studies scored at once in this one process through one shared "
                             "model (overrides worker.threads)")
    worker.add_argument("--batch-views", type=int, default=None, metavar="N",
                        help="views per forward pass across studies (overrides "
                             "worker.batch_views; 0: each study alone)")
    worker.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                        help="how long a batch waits for more views (overrides "
                             "worker.batch_wait_ms)")
    worker.add_argument("--pipeline", default=None, metavar="NAME",
                        help="score the runs of this pipeline (settings `pipelines`; default: "
                             "the implicit one of a config without them)")
    worker.set_defaults(func=cmd_worker)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file (exit 2 on error)")
    check.add_argument("file")
    check.add_argument("--schema-only", action="store_true",
                       help="check the file alone, not this machine (environment, bundle, spool, "
                            "TLS files): for a config written for another host or a container")
    check.set_defaults(func=cmd_config_check)

    echo = commands.add_parser("echo", help="C-ECHO a configured destination, or every one "
                                            "(a DICOMweb one: a QIDO-RS query with its token)")
    echo.add_argument("peer", nargs="?",
                      help="destination name from the config (default: every destination)")
    echo.add_argument("--config", required=True)
    echo.set_defaults(func=cmd_echo)

    selftest = commands.add_parser(
        "selftest", help="send a synthetic study through the running node and check its results "
                         "reach the destinations (exit 0 ok, 1 failed: for monitoring)")
    selftest.add_argument("--config", required=True)
    selftest.add_argument("--destination", action="append", metavar="NAME",
                          help="destination whose results to check (repeatable; default: all)")
    selftest.add_argument("--timeout-s", type=float, default=300.0,
                          help="how long to wait for the results (default 300)")
    selftest.add_argument("--pipeline", metavar="NAME",
                          help="through this pipeline's AE title (settings `pipelines`; default: "
                               "the first)")
    selftest.add_argument("--calling-ae", help="allowed caller to send as (default: the first "
                                               "admitted from the listener's address)")
    selftest.set_defaults(func=cmd_selftest)

    status = commands.add_parser(
        "status", help="runs, queue, workers and their models, latest failures, disk "
                       "(exit 1 when something is wrong)")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.set_defaults(func=cmd_status)

    drift = commands.add_parser(
        "drift", help="score drift per source against the bundle's reference: report.md, "
                      "drift.json, drift.png (exit 1 on a significant shift)")
    drift.add_argument("--config", required=True)
    drift.add_argument("--out", required=True, help="folder for the report")
    drift.set_defaults(func=cmd_drift)

    shadow = commands.add_parser("shadow", help="the shadow bundle (a safe model swap)")
    shadow_commands = shadow.add_subparsers(dest="shadow_command", required=True)
    shadow_report = shadow_commands.add_parser(
        "report", help="agreement of the shadow and live scores (verdicts, rank correlation, mean "
                       "absolute difference) and, with outcomes, the AUC of each")
    shadow_report.add_argument("--config", required=True)
    shadow_report.add_argument("--outcomes", metavar="CSV",
                               help="study_uid,label rows (label 1 = cancer): AUC of both models")
    shadow_report.add_argument("--pipeline", metavar="NAME", help="only this pipeline's runs")
    shadow_report.add_argument("--json", action="store_true", help="one JSON object")
    shadow_report.set_defaults(func=cmd_shadow_report)

    runs = commands.add_parser("runs", help="inspect runs in the spool")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    runs_list = runs_commands.add_parser("list", help="one JSON line per run")
    runs_list.add_argument("--config", required=True)
    runs_list.add_argument("--state", choices=list(RUN_STATES), action="append",
                           help="only runs in this state (repeatable)")
    runs_list.set_defaults(func=cmd_runs_list)

    runs_retry = runs_commands.add_parser(
        "retry", help="put a failed (or done, discarded) run back in the queue, attempts reset")
    runs_retry.add_argument("run_id")
    runs_retry.add_argument("--config", required=True)
    runs_retry.set_defaults(func=cmd_runs_retry)

    runs_discard = runs_commands.add_parser(
        "discard", help="move a queued or failed run to discarded/ (refused while worked on)")
    runs_discard.add_argument("run_id")
    runs_discard.add_argument("--reason", help="why (kept in discarded.json and the audit trail)")
    runs_discard.add_argument("--config", required=True)
    runs_discard.set_defaults(func=cmd_runs_discard)

    runs_purge = runs_commands.add_parser(
        "purge", help="delete finished runs (done, failed, discarded) and their instances")
    runs_purge.add_argument("--older-than", type=float, metavar="DAYS",
                            help="age limit in days (default: spool.retention_days)")
    runs_purge.add_argument("--config", required=True)
    runs_purge.set_defaults(func=cmd_runs_purge)

    export = commands.add_parser(
        "export-training", help="write the scored studies in done/ as a de-identified training "
                                "set (DICOM + manifest for tools/model); key from "
                                "MAMMO_NODE_DEID_KEY or --key-file")
    export.add_argument("--config", required=True)
    export.add_argument("--out", type=Path, required=True, help="new or empty folder")
    export.add_argument("--outcomes", type=Path, metavar="CSV",
                        help="study_uid or accession_number, label and/or malignant [, laterality]")
    export.add_argument("--since", type=float, metavar="DAYS",
                        help="only runs finished in the last DAYS days")
    export.add_argument("--key-file", type=Path,
                        help="the site's pseudonymisation key (default: $MAMMO_NODE_DEID_KEY)")
    export.set_defaults(func=cmd_export_training)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

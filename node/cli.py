"""`mammo-node`: serve, worker, config check, echo, runs.

Exit codes: 0 success, 1 the operation failed (peer unreachable, run not found, run in a state
that does not allow it), 2 bad usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from node.audit import open_audit
from node.errors import ConfigError, TransientError
from node.logs import configure_logging, get_logger
from node.runs import read_record, read_run_info, read_superseded
from node.settings import Settings, load_settings
from node.spool import RUN_STATES, RunState, RunStateError, Spool

log = get_logger("node.cli")


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None


def _check_tls_files(settings: Settings) -> None:
    """Load every configured certificate and key now, so a bad file fails the check, not a handshake."""
    from node.tls import client_context, server_context

    if settings.node.tls is not None:
        server_context(settings.node.tls)
    for index, destination in enumerate(settings.destinations):
        if destination.tls is not None:
            client_context(destination.tls, f"destinations[{index}].tls")


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
        _check_tls_files(settings)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    print(f"{args.file}: ok (ae_title {settings.node.ae_title}, "
          f"{len(settings.allowed_callers)} allowed caller(s), "
          f"{len(settings.destinations)} destination(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import NodeService

    settings = _load(args.config)
    configure_logging(args.log_level)
    try:
        _check_tls_files(settings)
        service = NodeService(settings)
        service.start()
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    except OSError as error:
        log.error("node_start_failed", reason=error.strerror or str(error),
                  port=settings.node.port)
        return 1
    stop = threading.Event()
    # The handler only sets an event: shutting pynetdicom down from a signal handler deadlocks.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    service.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    configure_logging(args.log_level)
    # Load the bundle in a throwaway process first: a missing or mismatched bundle stops the
    # worker here with one clear line, and no torch thread pool exists before Celery forks.
    check = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pipelines.model import load_bundle; from node.errors import ModelError\n"
         "try:\n  load_bundle(sys.argv[1], sys.argv[2])\n"
         "except ModelError as e:\n  print(e, file=sys.stderr); sys.exit(2)",
         str(settings.model.bundle_dir), settings.model.device],
        capture_output=True, text=True, check=False,
    )
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or ["unknown error"])[-1]
        log.error("model_bundle_rejected", bundle_dir=str(settings.model.bundle_dir), reason=reason)
        print(f"model bundle rejected: {reason}", file=sys.stderr)
        return 2
    os.environ["MAMMO_NODE_CONFIG"] = str(Path(args.config).resolve())
    os.environ["MAMMO_NODE_LOG_LEVEL"] = args.log_level
    from pipelines.celery_app import configure

    app = configure(settings)
    app.worker_main([
        "worker",
        f"--loglevel={args.log_level}",
        f"--queues={settings.broker.queue}",
        f"--concurrency={args.concurrency}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname=mammo-worker-{os.getpid()}@%h",
    ])
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.scu import echo

    settings = _load(args.config)
    configure_logging(args.log_level)
    matches = [d for d in settings.destinations if d.name == args.peer]
    if not matches:
        known = ", ".join(d.name for d in settings.destinations) or "none"
        print(f"unknown destination {args.peer!r} (configured: {known})", file=sys.stderr)
        return 2
    try:
        status = echo(settings, matches[0])
    except TransientError as error:
        print(f"C-ECHO {args.peer}: failed: {error}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer} ({matches[0].ae_title}@{matches[0].host}:{matches[0].port}): "
          f"status 0x{status:04X}")
    return 0 if status == 0 else 1


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


def cmd_runs_list(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    spool = Spool(settings.spool.dir)
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
    try:
        from_state, _ = spool.discard_run(args.run_id, reason=args.reason or "")
    except FileNotFoundError:
        print(f"run {args.run_id!r} not found", file=sys.stderr)
        return 1
    except RunStateError as error:
        print(f"cannot discard: {error}", file=sys.stderr)
        return 1
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
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="DICOM listener and study completion watcher")
    serve.add_argument("--config", required=True)
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="Celery worker that scores studies")
    worker.add_argument("--config", required=True)
    worker.add_argument("--concurrency", type=int, default=1)
    worker.set_defaults(func=cmd_worker)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file (exit 2 on error)")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)

    echo = commands.add_parser("echo", help="C-ECHO a configured destination")
    echo.add_argument("peer", help="destination name from the config")
    echo.add_argument("--config", required=True)
    echo.set_defaults(func=cmd_echo)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""`mammo-node`: serve, worker, config check, echo, runs.

Exit codes: 0 success, 1 the operation failed (peer unreachable, run not found), 2 bad usage or
invalid configuration.
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

from node.errors import ConfigError, TransientError
from node.logs import configure_logging, get_logger
from node.settings import Settings, load_settings
from node.spool import RECORD_NAME, RUN_NAME, RUN_STATES, Spool

log = get_logger("node.cli")


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
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
    service = NodeService(settings)
    try:
        service.start()
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


def cmd_runs_list(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    spool = Spool(settings.spool.dir)
    states = [args.state] if args.state else list(RUN_STATES)
    for state in states:
        folder = spool.state_dir(state)
        if not folder.is_dir():
            continue
        for run_id in spool.runs(state):
            info = {"run_id": run_id, "state": state}
            for name in (RUN_NAME, RECORD_NAME):
                try:
                    data = json.loads((folder / run_id / name).read_text())
                except (OSError, ValueError):
                    continue
                info.update({k: data[k] for k in ("study_uid", "completion_reason", "error")
                             if k in data})
            print(json.dumps(info, sort_keys=True))
    return 0


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
    runs_list.add_argument("--state", choices=list(RUN_STATES))
    runs_list.set_defaults(func=cmd_runs_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

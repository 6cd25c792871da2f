"""`mammo-node serve`: the listener plus the completion watcher that turns studies into runs.

The watcher claims complete studies (incoming/ -> queued/) and publishes a Celery message for
every queued run that has none yet. A broker outage leaves runs in queued/, retried with backoff:
nothing is lost and the listener keeps accepting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from celery import Celery

from node.completion import AssociationTracker, due_studies
from node.errors import TransientError
from node.logs import get_logger
from node.queueing import build_publisher, publish_run
from node.scp import StoreSCP
from node.settings import Settings
from node.spool import Spool

log = get_logger("node.service")

TMP_MAX_AGE_S = 6 * 3600  # a chunked receive older than this belongs to a dead association


class CompletionWatcher:
    """Applies the completion rule and publishes runs; `tick()` is one pass (tests call it)."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        tracker: AssociationTracker,
        publisher: Celery,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self.publisher = publisher
        self.clock = clock
        self._next_publish_at: dict[str, float] = {}
        self._publish_failures: dict[str, int] = {}

    def tick(self) -> list[str]:
        """Claim due studies and publish unpublished runs; returns the run ids published now."""
        now = self.clock()
        for study, reason in due_studies(
            self.spool.incoming_studies(), self.tracker.is_open, now, self.settings.completion
        ):
            run_id = self.spool.claim_study(study.study_key, reason)
            log.info(
                "study_completed",
                run_id=run_id,
                study_uid=study.study_uid,
                reason=reason,
                instance_count=len(study.instances),
                views=sorted(study.view_keys),
                waited_s=round(now - study.first_received_at, 2),
            )
        return self._publish_pending(now)

    def _publish_pending(self, now: float) -> list[str]:
        published = []
        for run_id in self.spool.unpublished_runs():
            if self._next_publish_at.get(run_id, 0.0) > now:
                continue
            try:
                publish_run(self.publisher, self.settings, run_id)
            except TransientError as error:
                failures = self._publish_failures.get(run_id, 0) + 1
                self._publish_failures[run_id] = failures
                delay_s = min(60.0, 2.0 ** min(failures, 6))
                self._next_publish_at[run_id] = now + delay_s
                log.warning("run_publish_failed", run_id=run_id, reason=str(error),
                            attempt=failures, retry_in_s=delay_s)
                break  # the broker is away: don't block on every queued run in this pass
            self.spool.mark_published(run_id)
            self._next_publish_at.pop(run_id, None)
            self._publish_failures.pop(run_id, None)
            log.info("run_published", run_id=run_id)
            published.append(run_id)
        return published


class NodeService:
    """Listener + watcher thread, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool.dir).ensure()
        self.tracker = AssociationTracker()
        self.scp = StoreSCP(settings, self.spool, self.tracker)
        self.watcher = CompletionWatcher(settings, self.spool, self.tracker,
                                         build_publisher(settings))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        removed = self.spool.purge_tmp()
        address = self.scp.start()
        self._thread = threading.Thread(target=self._watch, name="completion-watcher", daemon=True)
        self._thread.start()
        log.info("node_started", ae_title=self.settings.node.ae_title, host=address[0],
                 port=address[1], stale_tmp_files_removed=removed)
        return address

    def _watch(self) -> None:
        interval_s = self.settings.completion.poll_interval_s
        last_purge = time.monotonic()
        while not self._stop.wait(interval_s):
            try:
                self.watcher.tick()
                if time.monotonic() - last_purge > 600:
                    self.spool.purge_tmp(older_than_s=TMP_MAX_AGE_S)
                    last_purge = time.monotonic()
            except Exception as error:  # the watcher must outlive any one bad pass
                log.exception("watcher_pass_failed", reason=type(error).__name__)

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        log.info("node_stopped")

"""`mammo-node serve`: the listener, the completion watcher and the reconciler.

The spool is the outbox. The watcher claims complete studies (incoming/ -> queued/) and
publishes a Celery message for every queued run that has none yet; a broker outage leaves runs
in queued/, retried with backoff, and the listener keeps accepting. The reconciler repairs what
a message alone cannot: runs whose message was lost (Redis restarted empty) and runs abandoned
by a dead worker (work/ with a free lock). Retention purge runs from the same thread.
See docs/RELIABILITY.md for the recovery-time bounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from celery import Celery

from node.audit import AuditLog, open_audit
from node.completion import AssociationTracker, due_studies
from node.errors import TransientError
from node.leases import Leases
from node.logs import get_logger
from node.monitoring import MonitoringServer, start_node_monitoring
from node.queueing import build_publisher, publish_run, waiting_run_ids
from node.runs import RunRecord, attempts_exhausted
from node.scp import StoreSCP
from node.settings import Settings
from node.spool import IncomingStudy, Spool

log = get_logger("node.service")

TMP_MAX_AGE_S = 6 * 3600  # a chunked receive older than this belongs to a dead association
DAY_S = 86400.0


class CompletionWatcher:
    """Applies the completion rule and publishes runs; `tick()` is one pass (tests call it)."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        tracker: AssociationTracker,
        publisher: Celery,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.tracker = tracker
        self.publisher = publisher
        self.clock = clock
        self.audit = audit or open_audit(settings, "watcher")
        self._next_publish_at: dict[str, float] = {}
        self._publish_failures: dict[str, int] = {}
        self._orphans: set[str] = set()  # runs of a pipeline the config no longer has

    def tick(self) -> list[str]:
        """Claim due studies and publish unpublished runs; returns the run ids published now.

        The studies come from the spool's in-memory index of incoming/: a tick reads no manifest.
        """
        now = self.clock()
        for study, reason in self._due(now):
            run_id = self.spool.claim_study(study.study_key, reason)
            info = self.spool.run_info(run_id)
            instance_count = info.instance_count if info else len(study.instances)
            supersedes = list(info.supersedes) if info else []
            log.info(
                "study_completed",
                run_id=run_id,
                study_uid=study.study_uid,
                reason=reason,
                instance_count=instance_count,
                views=sorted(study.view_keys),
                waited_s=round(now - study.first_received_at, 2),
                supersedes=supersedes,
            )
            self.audit.record("study_queued", run_id=run_id, study_uid=study.study_uid,
                              reason=reason, instance_count=instance_count,
                              supersedes=supersedes)
        return self._publish_pending(now)

    def _due(self, now: float) -> list[tuple[IncomingStudy, str]]:
        """Due studies, each by its pipeline's completion rule (a study of a pipeline no longer
        configured by the top-level one, so it becomes a run IT can see and discard)."""
        studies = self.spool.incoming_studies()
        rules = {("" if p.implicit else p.name): p.completion for p in self.settings.pipeline_list}
        due = []
        for name in sorted({s.pipeline for s in studies}):
            due += due_studies([s for s in studies if s.pipeline == name], self.tracker.is_open,
                               now, rules.get(name, self.settings.completion))
        return due

    def _publish_pending(self, now: float) -> list[str]:
        published = []
        for run_id in self.spool.unpublished_runs():
            if self._next_publish_at.get(run_id, 0.0) > now:
                continue
            info = self.spool.run_info(run_id)
            pipeline = info.pipeline if info is not None else None
            if self.settings.pipeline(pipeline) is None:
                if run_id not in self._orphans:  # no worker would take it: say so once
                    self._orphans.add(run_id)
                    log.warning("run_pipeline_not_configured", run_id=run_id, pipeline=pipeline)
                continue
            try:
                publish_run(self.publisher, self.settings, run_id, pipeline)
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


class Reconciler:
    """The periodic repair pass that makes the spool a durable outbox; `tick()` is one pass.

    - A run in work/ whose lock has been free for `reconcile.abandoned_after_s` (seen free on
      two passes that far apart) was abandoned by a dead worker: back to queued/, unpublished,
      its attempts counter kept; one that already used `scoring.max_attempts` goes to failed/.
      With `claims.mode: redis` "free" also means that no worker holds the run's lease
      (node/leases.py), and the move is made holding the lease, so no worker takes the run
      meanwhile; when Redis cannot answer, nothing is recovered in that pass.
    - A queued run published more than `reconcile.republish_after_s` ago whose message is
      neither waiting in the broker queue nor reserved by a worker within that time is
      unpublished, so the watcher publishes it again. A message that is merely waiting in a
      long queue is never duplicated.
    - A queued run that supersedes earlier runs makes sure they say so (a crash between the
      claim and those notes is repaired here).

    Duplicates are harmless anyway: a worker given a run that is not in queued/ (or abandoned)
    does nothing.
    """

    def __init__(self, settings: Settings, spool: Spool, clock: Callable[[], float] = time.time,
                 audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.clock = clock
        self.audit = audit or open_audit(settings, "watcher")
        self._free_since: dict[str, float] = {}
        self.leases = Leases.from_settings(settings)

    def tick(self) -> dict[str, list[str]]:
        """One pass; returns what it did: {"requeued": [...], "failed": [...], "republish": [...]}."""
        now = self.clock()
        done: dict[str, list[str]] = {"requeued": [], "failed": [], "republish": []}
        self._recover_abandoned(now, done)
        self._republish_lost(now, done)
        self._note_superseded()
        return done

    def _recover_abandoned(self, now: float, done: dict[str, list[str]]) -> None:
        work = self.spool.runs("work")
        for run_id in list(self._free_since):
            if run_id not in work:
                del self._free_since[run_id]
        for run_id in work:
            try:
                free = self._free(run_id)
            except TransientError as error:
                log.warning("reconcile_broker_unavailable", reason=str(error))
                return  # a worker may hold any of them: wait for the broker
            if not free:
                self._free_since.pop(run_id, None)
                continue
            first_free = self._free_since.setdefault(run_id, now)
            if now - first_free < self.settings.reconcile.abandoned_after_s:
                continue
            self._recover(run_id, now, first_free, done)
            self._free_since.pop(run_id, None)

    def _free(self, run_id: str) -> bool:
        """Nobody works on the run: its flock is free and, with Redis claims, no lease exists."""
        if self.leases is not None and self.leases.held(run_id):
            return False
        with self.spool.lock_if_free(run_id) as path:
            return path is not None

    def _recover(self, run_id: str, now: float, first_free: float, done: dict[str, list[str]]
                 ) -> None:
        """Requeue (or fail) an abandoned run, holding its lease with Redis claims."""
        if self.leases is None:
            self._requeue_or_fail(run_id, now, first_free, done)
            return
        try:
            lease = self.leases.acquire(run_id)
        except TransientError as error:
            log.warning("reconcile_broker_unavailable", reason=str(error))
            return
        if lease is None:
            return  # a worker took it since we looked
        try:
            self._requeue_or_fail(run_id, now, first_free, done)
        finally:
            lease.release()

    def _requeue_or_fail(self, run_id: str, now: float, first_free: float,
                         done: dict[str, list[str]]) -> None:
        info = self.spool.run_info(run_id)
        attempts = info.attempts if info else 0
        study_uid = info.study_uid if info else ""
        if attempts >= self.settings.scoring.max_attempts:
            failure = attempts_exhausted(attempts)
            record = RunRecord(run_id=run_id, study_uid=study_uid, state="failed",
                               attempts=attempts, error=failure,
                               completion_reason=info.completion_reason if info else None)
            if self.spool.fail_abandoned(run_id, record):
                log.warning("run_abandoned_given_up", run_id=run_id, study_uid=study_uid,
                            attempts=attempts)
                self.audit.record("study_failed", run_id=run_id, study_uid=study_uid,
                                  reason=str(failure), attempts=attempts)
                done["failed"].append(run_id)
        elif self.spool.requeue_abandoned(run_id):
            log.warning("run_abandoned_requeued", run_id=run_id, study_uid=study_uid,
                        attempts=attempts, free_for_s=round(now - first_free, 2))
            self.audit.record("run_requeued", run_id=run_id, study_uid=study_uid,
                              reason="abandoned_by_dead_worker", attempts=attempts)
            done["requeued"].append(run_id)

    def _republish_lost(self, now: float, done: dict[str, list[str]]) -> None:
        limit_s = self.settings.reconcile.republish_after_s
        stale = []
        for run_id in self.spool.runs("queued"):
            published_at = self.spool.published_at(run_id)
            if published_at is not None and now - published_at >= limit_s:
                stale.append((run_id, published_at))
        if not stale:
            return
        try:
            # A message a worker took less than republish_after_s ago is still on its way
            # (a worker starting up reserves it before its pool child can run it).
            waiting = waiting_run_ids(self.settings, reserved_within_s=limit_s, now=now)
        except TransientError as error:
            log.warning("reconcile_broker_unavailable", reason=str(error))
            return  # the watcher's publish backoff deals with an absent broker
        for run_id, published_at in stale:
            if run_id in waiting:
                continue
            self.spool.unpublish(run_id)
            log.warning("run_message_lost", run_id=run_id,
                        published_s_ago=round(now - published_at, 1))
            self.audit.record("run_requeued", run_id=run_id, reason="message_lost",
                              published_s_ago=round(now - published_at, 1))
            done["republish"].append(run_id)

    def _note_superseded(self) -> None:
        for run_id in self.spool.runs("queued"):
            info = self.spool.run_info(run_id)
            for earlier in info.supersedes if info else ():
                if self.spool.superseded_by(earlier) is None:
                    self.spool.mark_superseded(earlier, run_id)


def purge_expired(settings: Settings, spool: Spool, audit: AuditLog,
                  older_than_days: float | None = None, now: float | None = None
                  ) -> list[dict[str, str]]:
    """Retention: remove finished runs (done/failed/discarded) older than the limit, audited."""
    days = settings.spool.retention_days if older_than_days is None else older_than_days
    purged = spool.purge_finished(days * DAY_S, now=now)
    for item in purged:
        audit.record("run_purged", run_id=item["run_id"], study_uid=item["study_uid"],
                     state=item["state"], older_than_days=days)
    if purged:
        log.info("runs_purged", count=len(purged), older_than_days=days)
    return purged


class NodeService:
    """Listener + watcher thread (completion, publishing, reconciling, purging)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool.dir).ensure()
        self.tracker = AssociationTracker()
        self.scp = StoreSCP(settings, self.spool, self.tracker)
        self.audit = open_audit(settings, "watcher")
        self.watcher = CompletionWatcher(settings, self.spool, self.tracker,
                                         build_publisher(settings), audit=self.audit)
        self.reconciler = Reconciler(settings, self.spool, audit=self.audit)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.monitoring: MonitoringServer | None = None

    def start(self) -> tuple[str, int]:
        # First: a monitoring port in use or an unset token variable stops start-up here.
        self.monitoring = start_node_monitoring(self.settings, self.spool)
        removed = self.spool.purge_tmp()
        incoming = self.spool.index_incoming()  # what arrived before a restart is not forgotten
        address = self.scp.start()
        self._thread = threading.Thread(target=self._watch, name="completion-watcher", daemon=True)
        self._thread.start()
        log.info("node_started", ae_title=self.settings.node.ae_title, host=address[0],
                 port=address[1], stale_tmp_files_removed=removed, incoming_studies=incoming,
                 pipelines={p.name: p.ae_title for p in self.settings.pipeline_list})
        self.audit.record("node_started", ae_title=self.settings.node.ae_title, host=address[0],
                          port=address[1], tls=self.settings.node.tls is not None)
        return address

    def _watch(self) -> None:
        interval_s = self.settings.completion.poll_interval_s
        reconcile_s = self.settings.reconcile.interval_s
        last_tmp_purge = time.monotonic()
        last_reconcile = float("-inf")
        last_retention = float("-inf")  # at start, then every purge_interval_s
        while not self._stop.wait(interval_s):
            try:
                self.watcher.tick()
                if time.monotonic() - last_reconcile >= reconcile_s:
                    last_reconcile = time.monotonic()
                    if any(self.reconciler.tick().values()):
                        self.watcher.tick()  # publish what it put back at once
                if time.monotonic() - last_retention >= self.settings.reconcile.purge_interval_s:
                    last_retention = time.monotonic()
                    purge_expired(self.settings, self.spool, self.audit)
                if time.monotonic() - last_tmp_purge > 600:
                    self.spool.purge_tmp(older_than_s=TMP_MAX_AGE_S)
                    last_tmp_purge = time.monotonic()
            except Exception as error:  # the watcher must outlive any one bad pass
                log.exception("watcher_pass_failed", reason=type(error).__name__)

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.monitoring is not None:
            self.monitoring.stop()
        log.info("node_stopped")
        self.audit.record("node_stopped", ae_title=self.settings.node.ae_title)

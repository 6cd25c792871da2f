"""Run claims as Redis leases, for workers on other hosts (`claims.mode: redis`).

A flock on a shared filesystem is not a claim we control: a worker host cut off from the network
may still believe it holds one after the NFS server gave it away. So with `claims.mode: redis`
a worker's claim on a run is a lease in the broker's Redis:

- `acquire`: `SET mammo-node:lease:<run_id> <token> NX PX <lease_seconds>`: one holder at a
  time; the token is new for every attempt.
- `Lease.keep_alive`: a thread renews it every third of its time while the worker holds the run.
- `Lease.check` (the fence): compares the token and renews it in one Lua script, so a worker
  whose lease expired (cut off, paused) learns it before it writes into the run folder, moves
  the run, or sends; an unreachable Redis counts as lost. After a successful check the holder
  has a whole `claims.lease_seconds` for the step that follows.
- `Lease.release`: deletes the key if the token is still ours (compare and delete in Lua).

The reconciler (node/service.py) puts a run in work/ back in queued/ only when no lease exists
(and its flock is free on the node's host), taking the lease itself for the move, so a worker
and the reconciler never move the same run at once. docs/ARCHITECTURE.md explains the design
and how to size `lease_seconds`.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from node.errors import TransientError
from node.logs import get_logger
from node.settings import Settings
from node.spool import Spool

log = get_logger("node.leases")

LEASE_PREFIX = "mammo-node:lease:"

# KEYS[1] the lease, ARGV[1] the token, ARGV[2] the time to live in ms: 1 when renewed.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] the lease, ARGV[1] the token: 1 when it was ours and is gone now.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaseLost(Exception):  # noqa: N818 - a state, not a programming error
    """This worker no longer holds the run: it must not write, move or send anything of it."""


class Leases:
    """The leases of runs in one Redis (the broker's)."""

    def __init__(self, client: redis.Redis, lease_seconds: float) -> None:
        self.client = client
        self.ttl_ms = max(1, int(lease_seconds * 1000))
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings: Settings) -> Leases | None:
        """The leases of `claims.mode: redis`; None with local claims (flock only)."""
        if settings.claims.mode != "redis":
            return None
        timeout_s = settings.broker.publish_timeout_s
        client = redis.Redis.from_url(
            settings.broker.url_with_password(),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One try per call: a fence that cannot reach Redis must say so within the timeout.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, settings.claims.lease_seconds)

    @staticmethod
    def key(run_id: str) -> str:
        return f"{LEASE_PREFIX}{run_id}"

    def acquire(self, run_id: str) -> Lease | None:
        """The run's lease for a new attempt, or None when someone holds it; TransientError when
        Redis cannot answer."""
        token = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex}"
        try:
            taken = self.client.set(self.key(run_id), token, nx=True, px=self.ttl_ms)
        except redis.RedisError as error:
            raise TransientError(f"broker unavailable: {type(error).__name__}") from error
        return Lease(self, run_id, token) if taken else None

    def held(self, run_id: str) -> bool:
        """Does anyone hold the run's lease? TransientError when Redis cannot answer."""
        try:
            return bool(self.client.exists(self.key(run_id)))
        except redis.RedisError as error:
            raise TransientError(f"broker unavailable: {type(error).__name__}") from error

    def close(self) -> None:
        self.client.close()


class Lease:
    """One attempt's claim on one run."""

    def __init__(self, leases: Leases, run_id: str, token: str) -> None:
        self.leases = leases
        self.run_id = run_id
        self.token = token
        self.lost = threading.Event()  # a renewal found the lease gone or taken

    def renew(self) -> bool:
        """Extend the lease to a whole time to live if it is still ours (atomic compare)."""
        result = self.leases._renew(keys=[Leases.key(self.run_id)],
                                    args=[self.token, self.leases.ttl_ms])
        return bool(result)

    def check(self, step: str) -> None:
        """The fence before `step`: LeaseLost unless the lease is still ours (renewed now, so
        the step has a whole time to live); an unreachable Redis counts as lost."""
        try:
            held = not self.lost.is_set() and self.renew()
        except redis.RedisError as error:
            raise LeaseLost(f"lease of run {self.run_id} not confirmed before {step}: "
                            f"broker unavailable ({type(error).__name__})") from error
        if not held:
            self.lost.set()
            raise LeaseLost(f"lease of run {self.run_id} lost before {step}")

    def release(self) -> None:
        """Give the run up (best effort: an unreachable Redis lets it expire)."""
        try:
            self.leases._release(keys=[Leases.key(self.run_id)], args=[self.token])
        except redis.RedisError as error:
            log.warning("lease_not_released", run_id=self.run_id, reason=type(error).__name__)

    @contextmanager
    def keep_alive(self) -> Iterator[Lease]:
        """Renew the lease every third of its time until the block ends."""
        stop = threading.Event()
        interval_s = self.leases.ttl_ms / 3000.0

        def renew_until_stopped() -> None:
            while not stop.wait(interval_s):
                try:
                    if not self.renew():
                        self.lost.set()
                        log.warning("lease_lost", run_id=self.run_id)
                        return
                except redis.RedisError as error:  # keep trying: the fence decides
                    log.warning("lease_renew_failed", run_id=self.run_id,
                                reason=type(error).__name__)

        thread = threading.Thread(target=renew_until_stopped, name=f"lease-{self.run_id}",
                                  daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=1.0)  # a renewal stuck on a dead link ends with its timeout


@contextmanager
def hold_claimed_run(spool: Spool, run_id: str, leases: Leases | None
                     ) -> Iterator[tuple[Path, Lease | None] | None]:
    """A worker's hold on a run: its folder in work/ and, with `claims.mode: redis`, the
    lease kept alive meanwhile; None when the run is not ours (held by another worker, already
    finished, or the broker cannot say).

    The lease is taken before the run is touched and given up after the flock, so the
    reconciler never finds the run both unleased and unlocked while a live worker holds it.
    """
    if leases is None:
        with spool.hold_run(run_id) as path:
            yield None if path is None else (path, None)
        return
    try:
        lease = leases.acquire(run_id)
    except TransientError as error:
        log.warning("run_lease_unavailable", run_id=run_id, reason=str(error))
        yield None
        return
    if lease is None:
        yield None
        return
    try:
        with lease.keep_alive(), spool.hold_run(run_id) as path:
            yield None if path is None else (path, lease)
    finally:
        lease.release()

"""Run claims as Redis leases (`claims.mode: redis`, node/leases.py) against a real Redis.

One holder at a time; renewal and release only with the holder's token; a lease kept alive
outlives its time to live; the fence refuses a worker whose lease expired, was taken, or whose
Redis is out of reach, and such a worker leaves the run folder exactly as it found it (no
record, no outputs, no move), so the worker that holds the run now finishes it alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from node.leases import LeaseLost, Leases, hold_claimed_run
from node.runs import InstanceEntry, read_record, read_run_info
from node.settings import Settings
from node.spool import Spool, hash_key
from pipelines.results import ModelIdentity
from pipelines.scoring import OUTPUTS_DIR, _publish_outputs, process_run
from tests.support.settings import make_settings
from tools.stack.make_study import make_study
from tools.stack.services import RedisService

pytestmark = [pytest.mark.integration, pytest.mark.requires_bin("redis-server")]


@pytest.fixture
def redis_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisService]:
    with RedisService(tmp_path / "redis") as service:
        monkeypatch.setenv("MAMMO_BROKER_PASSWORD", service.password)
        yield service


def _settings(tmp_path: Path, redis_service: RedisService, lease_seconds: float = 2.0
              ) -> Settings:
    return make_settings(
        tmp_path,
        broker={"url": f"redis://127.0.0.1:{redis_service.port}/0", "publish_timeout_s": 1},
        claims={"mode": "redis", "lease_seconds": lease_seconds},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )


def _leases(settings: Settings) -> Leases:
    leases = Leases.from_settings(settings)
    assert leases is not None
    return leases


def test_local_claims_make_no_leases(tmp_path: Path) -> None:
    assert Leases.from_settings(make_settings(tmp_path)) is None


def test_one_holder_and_only_the_holder_renews_or_releases(tmp_path: Path,
                                                           redis_service: RedisService) -> None:
    leases = _leases(_settings(tmp_path, redis_service))
    first = leases.acquire("run-1")
    assert first is not None
    assert leases.acquire("run-1") is None  # taken
    assert leases.held("run-1")
    assert leases.acquire("run-2") is not None  # per run
    intruder = leases.client.get(Leases.key("run-1"))
    leases.client.set(Leases.key("run-1"), b"someone-else", px=5000)
    assert not first.renew()
    first.release()  # not ours any more: left alone
    assert leases.client.get(Leases.key("run-1")) == b"someone-else" != intruder
    with pytest.raises(LeaseLost, match="lost before publish"):
        first.check("publish")
    leases.close()


def test_a_lease_kept_alive_outlives_its_time_and_expires_without(tmp_path: Path,
                                                                  redis_service: RedisService
                                                                  ) -> None:
    leases = _leases(_settings(tmp_path, redis_service, lease_seconds=1))
    kept = leases.acquire("kept")
    left = leases.acquire("left")
    assert kept is not None and left is not None
    with kept.keep_alive():
        time.sleep(2.5)
        kept.check("record")
    assert leases.held("kept") and not leases.held("left")
    with pytest.raises(LeaseLost):
        left.check("record")
    assert leases.acquire("left") is not None  # free for the next attempt
    kept.release()
    assert not leases.held("kept")


def test_the_fence_refuses_when_redis_is_out_of_reach(tmp_path: Path,
                                                      redis_service: RedisService) -> None:
    leases = _leases(_settings(tmp_path, redis_service))
    lease = leases.acquire("run-1")
    assert lease is not None
    lease.check("send")
    redis_service.stop()
    with pytest.raises(LeaseLost, match="broker unavailable"):
        lease.check("send")


def _claimed_run(spool: Spool, tmp_path: Path) -> str:
    for path in make_study(tmp_path / "study", views=["R-CC", "L-CC"], rows=64, cols=48, seed=5):
        ds = dcmread(path, stop_before_pixels=True)
        received = spool.tmp_dir / "received.part"
        received.write_bytes(path.read_bytes())
        spool.add_instance(received, InstanceEntry(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID),
            str(ds.ImageLaterality), str(ds.ViewPosition),
            hash_key(str(ds.SOPInstanceUID)) + ".dcm", path.stat().st_size, 1.0, "a"))
    [study] = spool.incoming_studies()
    return spool.claim_study(study.study_key, "quiet_period")


@dataclass(frozen=True)
class _Prediction:
    probability: float
    heatmap: np.ndarray


class _Model:
    """A flat heatmap and a fixed score; `during_predict` runs inside the attempt."""

    identity = ModelIdentity("flat", "0", 0.5)
    last_timings_s: dict[str, float] = {}

    def __init__(self, during_predict: object = None) -> None:
        self.during_predict = during_predict

    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        if callable(self.during_predict):
            self.during_predict()
        return [_Prediction(0.25, np.zeros(image.shape, np.float32)) for image in images]


def _run_folder_untouched_by_a_late_attempt(spool: Spool, run_id: str) -> None:
    """What a worker that lost its lease leaves: the run in work/, no record, no outputs."""
    located = spool.locate(run_id)
    assert located is not None and located[0] == "work"
    path = located[1]
    assert read_record(path) is None
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(OUTPUTS_DIR)) == []


def test_a_worker_whose_lease_is_taken_mid_run_writes_nothing_and_the_holder_finishes(
    tmp_path: Path, redis_service: RedisService
) -> None:
    settings = _settings(tmp_path, redis_service)
    spool = Spool(settings.spool.dir).ensure()
    run_id = _claimed_run(spool, tmp_path)
    leases = _leases(settings)
    key = Leases.key(run_id)

    def taken_over() -> None:  # its lease expired and another attempt took the run
        leases.client.set(key, b"other-worker", px=60_000)

    assert process_run(settings, spool, run_id, _Model(taken_over), leases=leases) is None
    _run_folder_untouched_by_a_late_attempt(spool, run_id)
    assert leases.client.get(key) == b"other-worker"  # its release left the holder's lease alone
    # The holder's attempt (here: the lease expired, a new attempt takes the run from work/).
    leases.client.delete(key)
    assert process_run(settings, spool, run_id, _Model(), leases=leases) == "done"
    record = read_record(spool.state_dir("done") / run_id)
    assert record is not None and record.outputs
    assert record.attempts == 2  # the refused attempt counted
    done = spool.state_dir("done") / run_id
    assert sorted(p.name for p in done.iterdir() if p.name.startswith(OUTPUTS_DIR)) == [OUTPUTS_DIR]
    assert sorted(f"{OUTPUTS_DIR}/{p.name}" for p in (done / OUTPUTS_DIR).iterdir()) == sorted(
        o.file for o in record.outputs)
    assert not leases.held(run_id)  # released at the end


def test_a_worker_cut_off_from_redis_mid_run_writes_nothing(tmp_path: Path,
                                                            redis_service: RedisService) -> None:
    settings = _settings(tmp_path, redis_service)
    spool = Spool(settings.spool.dir).ensure()
    run_id = _claimed_run(spool, tmp_path)
    assert process_run(settings, spool, run_id, _Model(redis_service.stop)) is None
    _run_folder_untouched_by_a_late_attempt(spool, run_id)
    info = read_run_info(spool.state_dir("work") / run_id)
    assert info is not None and info.attempts == 1
    redis_service.start()  # the lease died with Redis's memory: the run is free again
    assert process_run(settings, spool, run_id, _Model()) == "done"


def test_a_run_leased_by_another_worker_is_left_alone(tmp_path: Path,
                                                      redis_service: RedisService) -> None:
    settings = _settings(tmp_path, redis_service)
    spool = Spool(settings.spool.dir).ensure()
    run_id = _claimed_run(spool, tmp_path)
    leases = _leases(settings)
    other = leases.acquire(run_id)
    assert other is not None
    assert process_run(settings, spool, run_id, _Model(), leases=leases) is None
    assert spool.locate(run_id) == ("queued", spool.state_dir("queued") / run_id)
    with hold_claimed_run(spool, run_id, leases) as held:
        assert held is None
    other.release()
    with hold_claimed_run(spool, run_id, leases) as held:
        assert held is not None and held[0] == spool.state_dir("work") / run_id
        assert leases.held(run_id)
    assert not leases.held(run_id)


def test_an_attempt_publishes_its_outputs_whole_replacing_an_earlier_attempts(tmp_path: Path
                                                                               ) -> None:
    run_dir = tmp_path / "run"
    (run_dir / OUTPUTS_DIR).mkdir(parents=True)
    (run_dir / OUTPUTS_DIR / "sr.dcm").write_bytes(b"first attempt")
    (run_dir / OUTPUTS_DIR / "seg-stale.dcm").write_bytes(b"first attempt only")
    attempt = run_dir / f"{OUTPUTS_DIR}.attempt-2"
    attempt.mkdir()
    (attempt / "sr.dcm").write_bytes(b"second attempt")
    _publish_outputs(attempt, run_dir / OUTPUTS_DIR)
    assert sorted(p.name for p in run_dir.iterdir()) == [OUTPUTS_DIR]
    assert [p.name for p in (run_dir / OUTPUTS_DIR).iterdir()] == ["sr.dcm"]
    assert (run_dir / OUTPUTS_DIR / "sr.dcm").read_bytes() == b"second attempt"


def test_runs_discard_refuses_a_run_a_remote_worker_holds_by_its_lease(
    tmp_path: Path, redis_service: RedisService, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main
    from tests.support.settings import write_config

    overrides = {
        "broker": {"url": f"redis://127.0.0.1:{redis_service.port}/0", "publish_timeout_s": 1},
        "claims": {"mode": "redis", "lease_seconds": 30},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    settings = make_settings(tmp_path, **overrides)
    config = write_config(tmp_path / "node.yaml", **overrides)
    spool = Spool(settings.spool.dir).ensure()
    run_id = _claimed_run(spool, tmp_path)
    leases = _leases(settings)
    remote = leases.acquire(run_id)  # a worker on another host: its flock is not visible here
    assert remote is not None
    with spool.hold_run(run_id) as held:
        assert held is not None
    assert spool.locate(run_id)[0] == "work"  # type: ignore[index]
    capsys.readouterr()
    assert main(["runs", "discard", run_id, "--config", str(config)]) == 1
    assert "being worked on" in capsys.readouterr().err
    assert spool.locate(run_id)[0] == "work"  # type: ignore[index]
    assert leases.held(run_id)  # the refusal left the worker's lease alone
    remote.release()
    assert main(["runs", "discard", run_id, "--config", str(config)]) == 0
    assert spool.locate(run_id)[0] == "discarded"  # type: ignore[index]
    assert not leases.held(run_id)
    redis_service.stop()
    other = _claimed_run(spool, tmp_path / "second")
    capsys.readouterr()
    assert main(["runs", "discard", other, "--config", str(config)]) == 1
    assert "cannot tell whether a worker holds the run" in capsys.readouterr().err
    assert spool.locate(other)[0] == "queued"  # type: ignore[index]

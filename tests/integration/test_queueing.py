"""Publishing runs to a real Redis: ids only in messages, and a broker outage loses nothing."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import redis

from node.completion import AssociationTracker
from node.queueing import build_publisher
from node.runs import InstanceEntry
from node.service import CompletionWatcher
from node.spool import Spool, hash_key
from tests.support.settings import make_settings
from tools.stack.services import RedisService, free_port

pytestmark = [pytest.mark.integration, pytest.mark.requires_bin("redis-server")]


def _watcher(tmp_path: Path, port: int, monkeypatch: pytest.MonkeyPatch, password: str,
             clock: list[float]) -> CompletionWatcher:
    monkeypatch.setenv("MAMMO_BROKER_PASSWORD", password)
    settings = make_settings(tmp_path, completion={"quiet_period_s": 30, "deadline_s": 300},
                             broker={"url": f"redis://127.0.0.1:{port}/0", "publish_timeout_s": 1})
    spool = Spool(settings.spool.dir).ensure()
    return CompletionWatcher(settings, spool, AssociationTracker(), build_publisher(settings),
                             clock=lambda: clock[0])


def _receive_patient_study(spool: Spool) -> str:
    study_uid = "1.2.826.0.1.3680043.10.1.42"
    for index, key in enumerate(["R-CC", "L-CC"]):
        sop_uid = f"{study_uid}.{index + 1}"
        tmp = spool.tmp_dir / f"{index}.dcm"
        tmp.write_bytes(b"DICM")
        spool.add_instance(tmp, InstanceEntry(
            sop_uid, "1.2.840.10008.5.1.4.1.1.1.2", study_uid + ".9", study_uid,
            "1.2.840.10008.1.2.1", key[0], key[2:], hash_key(sop_uid) + ".dcm", 4, time.time(),
            "assoc"))
    return study_uid


def test_run_waits_in_queued_while_redis_is_down_then_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    clock = [time.time()]
    watcher = _watcher(tmp_path, port, monkeypatch, "s3cret-pw", clock)
    _receive_patient_study(watcher.spool)
    clock[0] += 31  # quiet period over
    assert watcher.tick() == []  # broker down: nothing published...
    [run_id] = watcher.spool.runs("queued")  # ...but the run is claimed and kept
    assert watcher.spool.unpublished_runs() == [run_id]
    with RedisService(tmp_path / "redis", port=port, password="s3cret-pw") as service:
        clock[0] += 120  # past the publish backoff
        assert watcher.tick() == [run_id]
        assert watcher.spool.unpublished_runs() == []
        client = redis.Redis(host="127.0.0.1", port=service.port, password=service.password)
        [raw] = client.lrange("mammo", 0, -1)
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        assert body[0] == [run_id]  # args: the run id, and nothing else
        assert message["headers"]["task"] == "pipelines.score_study"
        assert message["content-type"] == "application/json"
        assert "1.2.826.0.1.3680043.10.1.42" not in raw.decode()

"""The group commit of received instances (node/receive.py GroupCommitter on node/spool.py
Spool.add_instances): every waiter is answered only once its instance is recorded, instances
queued together share one commit, and one failure stays with its own instance."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from node.receive import GroupCommitter
from node.runs import InstanceEntry, read_manifest
from node.spool import Spool, hash_key


def _entry(sop_uid: str, study_uid: str = "1.2.3") -> InstanceEntry:
    return InstanceEntry(
        sop_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", series_uid="1.2.3.4",
        study_uid=study_uid, transfer_syntax_uid="1.2.840.10008.1.2.1", laterality="R",
        view="CC", file=hash_key(sop_uid) + ".dcm", size_bytes=4, received_at=time.time(),
        association_id="assoc")


def _received(spool: Spool, entry: InstanceEntry) -> Path:
    path = spool.tmp_dir / f"recv-{entry.sop_uid}"
    path.write_bytes(b"DICM")
    return path


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


def test_instances_queued_together_share_a_commit_and_each_waiter_sees_its_own(
        spool: Spool) -> None:
    committer = GroupCommitter(spool)
    entries = [_entry(f"1.2.3.{n}", study_uid=f"1.2.{n % 3}") for n in range(12)]
    answers: dict[str, Path | BaseException] = {}

    def send(entry: InstanceEntry) -> None:
        try:
            answers[entry.sop_uid] = committer.commit(_received(spool, entry), entry)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion
            answers[entry.sop_uid] = error

    # The spool's lock held: the commit thread can take a group but not record it, so every
    # instance is queued before any is recorded (as when associations receive at once).
    with spool._lock:
        senders = [threading.Thread(target=send, args=(e,)) for e in entries]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 10
        while committer.waiting < len(entries) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answers == {}, "nobody is answered before the commit"
    for sender in senders:
        sender.join(10)
    try:
        assert committer.groups <= 2, "twelve instances queued together: one or two commits"
        for entry in entries:
            path = answers[entry.sop_uid]
            assert path == spool.incoming_dir / hash_key(entry.study_uid) / entry.file
            assert isinstance(path, Path) and path.read_bytes() == b"DICM"
            assert entry.sop_uid in {e.sop_uid for e in read_manifest(path.parent)}
    finally:
        committer.stop()


def test_an_instance_that_cannot_be_recorded_raises_for_its_sender_only(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    try:
        with pytest.raises(FileNotFoundError):
            committer.commit(spool.tmp_dir / "never-written.dcm", _entry("1.2.3.1"))
        entry = _entry("1.2.3.2")
        path = committer.commit(_received(spool, entry), entry)
        assert [e.sop_uid for e in read_manifest(path.parent)] == ["1.2.3.2"]
    finally:
        committer.stop()


def test_a_resend_is_answered_before_the_earlier_copy_is_deleted_then_tmp_is_empty(
        spool: Spool) -> None:
    committer = GroupCommitter(spool)
    entry = _entry("1.2.3.1")
    try:
        first = committer.commit(_received(spool, entry), entry)
        second = committer.commit(_received(spool, entry), entry)
        assert first == second
    finally:
        committer.stop()  # after the group it was in, the earlier copy is gone
    assert not list(spool.tmp_dir.iterdir())
    [study] = spool.incoming_studies()
    assert [e.sop_uid for e in study.instances] == ["1.2.3.1"]

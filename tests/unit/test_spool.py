"""Spool transitions: atomic moves, hashed names, duplicate deliveries, abandoned runs."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

import node.spool
from node.completion import AssociationTracker
from node.queueing import build_publisher
from node.runs import InstanceEntry, append_sent, read_manifest, read_sent
from node.service import CompletionWatcher
from node.spool import Spool, free_bytes, hash_key
from tests.support.settings import make_settings


def _entry(sop_uid: str, study_uid: str = "1.2.3", view: str = "CC", lat: str = "R") -> InstanceEntry:
    return InstanceEntry(
        sop_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", series_uid="1.2.3.4",
        study_uid=study_uid, transfer_syntax_uid="1.2.840.10008.1.2.1", laterality=lat, view=view,
        file=hash_key(sop_uid) + ".dcm", size_bytes=4, received_at=time.time(),
        association_id="assoc")


def _receive(spool: Spool, entry: InstanceEntry) -> Path:
    tmp = spool.tmp_dir / f"recv-{entry.sop_uid}"
    tmp.write_bytes(b"DICM")
    return spool.add_instance(tmp, entry)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


def test_instance_lands_under_hashed_names(spool: Spool) -> None:
    path = _receive(spool, _entry("1.2.3.4.5"))
    assert path.parent == spool.incoming_dir / hash_key("1.2.3")
    assert path.name == hash_key("1.2.3.4.5") + ".dcm"
    assert "1.2.3" not in str(path.relative_to(spool.root))
    assert not list(spool.tmp_dir.iterdir())


def test_repeated_instance_keeps_one_manifest_entry(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    _receive(spool, _entry("1.2.3.4.5"))
    [study] = spool.incoming_studies()
    assert len(study.instances) == 1


def test_torn_manifest_line_is_ignored(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    folder = spool.incoming_dir / hash_key("1.2.3")
    with open(folder / "manifest.jsonl", "a") as manifest:
        manifest.write('{"sop_uid": "1.2.3.4.6", "sop_cl')
    assert [e.sop_uid for e in read_manifest(folder)] == ["1.2.3.4.5"]


def _received(spool: Spool, entry: InstanceEntry, content: bytes = b"DICM") -> Path:
    tmp = spool.tmp_dir / f"recv-{entry.sop_uid}"
    tmp.write_bytes(content)
    return tmp


def test_a_group_commit_records_every_instance_of_every_study(spool: Spool) -> None:
    spool.incoming_studies()  # the index exists: the commit must keep it up to date
    entries = [_entry("1.2.3.1"), _entry("1.2.3.2", view="MLO"),
               _entry("1.2.4.1", study_uid="1.2.4", lat="L")]
    outcomes = spool.add_instances([(_received(spool, e), e) for e in entries])
    assert outcomes == [spool.incoming_dir / hash_key(e.study_uid) / e.file for e in entries]
    assert all(isinstance(path, Path) and path.read_bytes() == b"DICM" for path in outcomes)
    assert not list(spool.tmp_dir.iterdir())
    by_study = {s.study_uid: {e.sop_uid for e in s.instances} for s in spool.incoming_studies()}
    assert by_study == {"1.2.3": {"1.2.3.1", "1.2.3.2"}, "1.2.4": {"1.2.4.1"}}
    on_disk = Spool(spool.root)  # what a restarted node reads back
    assert {e.sop_uid for s in on_disk.incoming_studies() for e in s.instances} == {
        "1.2.3.1", "1.2.3.2", "1.2.4.1"}


def test_an_instance_that_cannot_be_committed_fails_alone(spool: Spool) -> None:
    good, lost = _entry("1.2.3.1"), _entry("1.2.3.2", view="MLO")
    gone = spool.tmp_dir / "vanished.dcm"  # its file is not there to fsync
    outcomes = spool.add_instances([(_received(spool, good), good), (gone, lost)])
    assert isinstance(outcomes[0], Path) and outcomes[0].is_file()
    assert isinstance(outcomes[1], FileNotFoundError)
    [study] = spool.incoming_studies()
    assert [e.sop_uid for e in study.instances] == ["1.2.3.1"]
    assert [e.sop_uid for e in read_manifest(spool.incoming_dir / hash_key("1.2.3"))] == ["1.2.3.1"]


def test_a_resent_instance_replaces_the_earlier_copy_which_is_deleted_after_the_commit(
        spool: Spool) -> None:
    entry = _entry("1.2.3.1")
    [first] = spool.add_instances([(_received(spool, entry, b"first"), entry)])
    [second] = spool.add_instances([(_received(spool, entry, b"second"), entry)])
    assert first == second and isinstance(second, Path) and second.read_bytes() == b"second"
    [kept] = spool.tmp_dir.iterdir()  # the earlier copy, linked until the commit is done
    assert kept.read_bytes() == b"first" and kept.name.startswith("replaced-")
    assert spool.drop_replaced() == 1
    assert not list(spool.tmp_dir.iterdir())
    assert second.read_bytes() == b"second"
    [study] = spool.incoming_studies()
    assert len(study.instances) == 1
    assert spool.purge_tmp() == 0


def test_claim_moves_the_study_to_queued_and_records_why(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    run_id = spool.claim_study(hash_key("1.2.3"), "quiet_period")
    assert spool.incoming_studies() == []
    state, path = spool.locate(run_id)  # type: ignore[misc]
    assert state == "queued"
    info = json.loads((path / "run.json").read_text())
    assert info["study_uid"] == "1.2.3" and info["completion_reason"] == "quiet_period"
    assert spool.unpublished_runs() == [run_id]
    spool.mark_published(run_id)
    assert spool.unpublished_runs() == []


def test_late_instance_after_claim_starts_a_new_study(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    spool.claim_study(hash_key("1.2.3"), "quiet_period")
    _receive(spool, _entry("1.2.3.4.6"))
    [study] = spool.incoming_studies()
    assert [i.sop_uid for i in study.instances] == ["1.2.3.4.6"]


def test_second_delivery_of_a_run_is_a_no_op(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    run_id = spool.claim_study(hash_key("1.2.3"), "deadline")
    with spool.hold_run(run_id) as held:
        assert held == spool.state_dir("work") / run_id
        with spool.hold_run(run_id) as again:
            assert again is None  # same process, another handle: the flock is taken
        spool.finish_run(run_id, "done")
    with spool.hold_run(run_id) as after_done:
        assert after_done is None
    assert spool.locate(run_id)[0] == "done"  # type: ignore[index]


def _hold_and_die(root: str, run_id: str) -> None:
    spool = Spool(Path(root))
    with spool.hold_run(run_id):
        import os

        os._exit(9)  # a worker killed mid-run: its flock goes with it


def test_run_abandoned_by_a_dead_worker_is_taken_over(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    run_id = spool.claim_study(hash_key("1.2.3"), "deadline")
    child = multiprocessing.get_context("fork").Process(target=_hold_and_die,
                                                       args=(str(spool.root), run_id))
    child.start()
    child.join(10)
    assert spool.locate(run_id)[0] == "work"  # type: ignore[index]
    with spool.hold_run(run_id) as held:
        assert held is not None


def test_run_ids_from_outside_never_escape_the_spool(spool: Spool) -> None:
    for bad in ("../x", "/tmp/x", "..", "a/b", "x" * 200, ""):
        assert spool.locate(bad) is None
        with spool.hold_run(bad) as held:
            assert held is None


def test_failed_run_can_be_requeued(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    run_id = spool.claim_study(hash_key("1.2.3"), "deadline")
    spool.mark_published(run_id)
    with spool.hold_run(run_id):
        spool.finish_run(run_id, "failed")
    append_sent(spool.state_dir("failed") / run_id, "pacs", "1.2.9", "0x0000")
    spool.requeue_run(run_id)
    assert spool.locate(run_id)[0] == "queued"  # type: ignore[index]
    assert spool.unpublished_runs() == [run_id]
    # what the failed attempt stored stays known: the retry sends only the rest
    assert read_sent(spool.state_dir("queued") / run_id) == {("pacs", "1.2.9"): "0x0000"}


def test_a_retried_run_that_had_succeeded_forgets_what_it_sent(spool: Spool) -> None:
    _receive(spool, _entry("1.2.3.4.5"))
    run_id = spool.claim_study(hash_key("1.2.3"), "deadline")
    with spool.hold_run(run_id):
        spool.finish_run(run_id, "done")
    append_sent(spool.state_dir("done") / run_id, "pacs", "1.2.9", "0x0000")
    spool.requeue_run(run_id)  # its operator wants it resent (a PACS restored from backup)
    assert read_sent(spool.state_dir("queued") / run_id) == {}


def test_purge_tmp_removes_abandoned_receives(spool: Spool) -> None:
    (spool.tmp_dir / "tmpabc.dcm").write_bytes(b"partial")
    assert spool.purge_tmp() == 1


def _count_manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = node.spool.read_manifest

    def counting(folder: Path) -> tuple[InstanceEntry, ...]:
        reads.append(folder)
        return real(folder)

    monkeypatch.setattr(node.spool, "read_manifest", counting)
    return reads


def test_the_watcher_reads_no_manifest_per_tick(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, completion={"quiet_period_s": 600, "deadline_s": 900})
    spool = Spool(settings.spool.dir).ensure()
    _receive(spool, _entry("1.2.3.1"))
    reads = _count_manifest_reads(monkeypatch)
    watcher = CompletionWatcher(settings, spool, AssociationTracker(), build_publisher(settings))
    for index in range(2, 7):
        assert watcher.tick() == []  # nothing due yet
        _receive(spool, _entry(f"1.2.3.{index}", view="MLO"))
    assert len(reads) == 1, "the index is built from disk once, then kept by add_instance"
    [study] = spool.incoming_studies()
    assert len(study.instances) == 6 and study.view_keys == {"R-CC", "R-MLO"}
    run_id = spool.claim_study(study.study_key, "deadline")
    assert spool.incoming_studies() == []
    info = spool.run_info(run_id)
    assert info is not None and info.instance_count == 6


def test_the_index_is_rebuilt_from_disk_after_a_restart(tmp_path: Path) -> None:
    before = Spool(tmp_path / "spool").ensure()
    _receive(before, _entry("1.2.3.4"))
    _receive(before, _entry("1.2.4.1", study_uid="1.2.4", lat="L"))
    assert len(before.incoming_studies()) == 2
    (before.incoming_dir / "empty-folder-of-a-crash").mkdir()  # no manifest: not a study
    after = Spool(tmp_path / "spool").ensure()  # the node restarted
    assert after.index_incoming() == 2
    assert after.incoming_studies() == before.incoming_studies()
    _receive(after, _entry("1.2.3.5", view="MLO"))
    by_uid = {s.study_uid: s for s in after.incoming_studies()}
    assert {e.sop_uid for e in by_uid["1.2.3"].instances} == {"1.2.3.4", "1.2.3.5"}


def test_free_bytes_of_an_unreachable_spool_is_zero(tmp_path: Path) -> None:
    assert free_bytes(tmp_path) > 0
    assert free_bytes(tmp_path / "missing") == 0  # as good as full: the listener refuses
    assert Spool(tmp_path / "missing").free_bytes() == 0

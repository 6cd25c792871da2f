"""The completion rule with a fake clock."""

from __future__ import annotations

from node.completion import AssociationTracker, completion_reason
from node.runs import InstanceEntry
from node.settings import CompletionSection
from node.spool import IncomingStudy

RULE = CompletionSection(quiet_period_s=30, deadline_s=300)


def _study(views: list[str], first: float = 1000.0, last: float | None = None) -> IncomingStudy:
    entries = []
    for index, key in enumerate(views):
        laterality, view = key.split("-")
        entries.append(InstanceEntry(
            sop_uid=f"1.2.3.{index}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
            series_uid="1.2.3", study_uid="1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
            laterality=laterality, view=view, file=f"{index}.dcm", size_bytes=1,
            received_at=first + index, association_id="a"))
    last_at = last if last is not None else first + len(views) - 1
    return IncomingStudy("key", "1.2", tuple(entries), first, last_at)


FOUR = ["R-CC", "L-CC", "R-MLO", "L-MLO"]


def test_four_views_and_released_is_complete_at_once() -> None:
    assert completion_reason(_study(FOUR), False, 1004.0, RULE) == "views_complete"


def test_four_views_but_association_open_waits_for_quiet_period() -> None:
    study = _study(FOUR)
    assert completion_reason(study, True, 1010.0, RULE) is None
    assert completion_reason(study, True, 1003.0 + 30, RULE) == "quiet_period"


def test_partial_study_waits_for_the_quiet_period() -> None:
    study = _study(["R-CC", "L-CC"])
    assert completion_reason(study, False, 1001.0 + 29.9, RULE) is None
    assert completion_reason(study, False, 1001.0 + 30, RULE) == "quiet_period"


def test_deadline_wins_over_a_trickle() -> None:
    study = _study(["R-CC"], first=1000.0, last=1299.0)
    assert completion_reason(study, True, 1299.5, RULE) is None
    assert completion_reason(study, True, 1300.0, RULE) == "deadline"


def test_views_without_laterality_do_not_count_as_screening_views() -> None:
    study = _study(["R-CC", "L-CC", "R-MLO", "-MLO"])
    assert completion_reason(study, False, 1004.0, RULE) is None


def test_tracker_open_until_every_association_closes() -> None:
    tracker = AssociationTracker()
    tracker.add("a1", "s")
    tracker.add("a2", "s")
    tracker.close("a1")
    assert tracker.is_open("s")
    tracker.close("a2")
    assert not tracker.is_open("s")

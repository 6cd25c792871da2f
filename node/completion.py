"""When is a study complete? An explicit rule, and the thread that applies it.

Complete when the four screening views are in and no association is still delivering the study,
or when nothing new arrived for the quiet period, or at the forced deadline after the first
instance — whichever comes first.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

from node.settings import CompletionSection
from node.spool import IncomingStudy

SCREENING_VIEWS: tuple[str, ...] = ("R-CC", "L-CC", "R-MLO", "L-MLO")  # report order
SCREENING_VIEW_KEYS = frozenset(SCREENING_VIEWS)


def completion_reason(
    study: IncomingStudy, association_open: bool, now: float, rule: CompletionSection
) -> str | None:
    """The reason the study is complete at `now`, or None to keep waiting (pure: tests pass a clock)."""
    if now - study.first_received_at >= rule.deadline_s:
        return "deadline"
    if SCREENING_VIEW_KEYS <= study.view_keys and not association_open:
        return "views_complete"
    if now - study.last_received_at >= rule.quiet_period_s:
        return "quiet_period"
    return None


class AssociationTracker:
    """Which studies are still being delivered by an open association (in memory, serve process).

    After a restart nothing is open, which is the truth: the associations died with the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies_by_association: dict[str, set[str]] = defaultdict(set)

    def add(self, association_id: str, study_key: str) -> None:
        with self._lock:
            self._studies_by_association[association_id].add(study_key)

    def close(self, association_id: str) -> None:
        with self._lock:
            self._studies_by_association.pop(association_id, None)

    def is_open(self, study_key: str) -> bool:
        with self._lock:
            return any(study_key in keys for keys in self._studies_by_association.values())


def due_studies(
    studies: list[IncomingStudy],
    is_open: Callable[[str], bool],
    now: float,
    rule: CompletionSection,
) -> list[tuple[IncomingStudy, str]]:
    """Studies whose completion rule fires at `now`, with the reason."""
    due = []
    for study in studies:
        reason = completion_reason(study, is_open(study.study_key), now, rule)
        if reason is not None:
            due.append((study, reason))
    return due

"""Plain result types passed from scoring to the writers (no DICOM, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.completion import SCREENING_VIEWS

__all__ = ["SCREENING_VIEWS", "ModelIdentity", "OutputSpec", "StudyResult", "ViewScore"]


@dataclass(frozen=True)
class ViewScore:
    """The model's output for one source image."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    laterality: str  # "R" or "L"
    view: str  # "CC", "MLO", ... (ViewPosition)
    probability: float

    @property
    def view_key(self) -> str:
        return f"{self.laterality}-{self.view}"


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the algorithm in the outputs (SR algorithm identification, SEG algorithm)."""

    name: str
    version: str
    operating_point: float  # probability at or above which a finding is reported as suspicious
    operating_point_name: str = "balanced"
    description: str = ""


@dataclass(frozen=True)
class StudyResult:
    """Scores of one run: per view, per breast (max of its views) and per exam (max of breasts)."""

    study_uid: str
    views: tuple[ViewScore, ...]
    breast_scores: dict[str, float]  # {"R": p, "L": p}, only breasts with at least one view
    exam_score: float
    missing_views: tuple[str, ...] = field(default=())  # e.g. ("R-CC",) of SCREENING_VIEWS
    # views received but not scored, outside the model's declared domain (`scoring.
    # outside_domain: skip`): (view key, reasons), e.g. ("R-CC", ("view",)); not in missing_views
    not_scored: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())


@dataclass(frozen=True)
class OutputSpec:
    """How one output object is written: its series and the UID root for deterministic UIDs."""

    series_number: int
    series_description: str
    uid_root: str | None = None  # None: 2.25 UUID-derived UIDs
    manufacturer: str = "mammo-node"
    software_version: str = "0.1.0"

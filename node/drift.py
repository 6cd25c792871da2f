"""Score drift per source against the model bundle's reference: the statistics and the store.

**The reference.** Each bundle's `metadata.json` carries `reference_scores`: the out-of-fold
image scores of its cross-validation (`predictions.jsonl`), sorted, with the PSI bins cut at
their deciles (`reference_from_scores`, the one definition of the bins, called by
`tools/model/export.py`). The node's scores are compared with it at the **image** level: the
model scores images, the reference is one score per image, while an exam score is the max of
up to four views (its distribution moves with the number of views, not with the images).

**The rolling store** (`DriftStore`, the one reader and writer of `<spool>/drift/`): one JSON
line per finished, scored run per source (model, model version, calling AE, manufacturer: the
labels of `mammo_exam_score`), appended by the worker after the run is recorded, trimmed to the
last `drift.window` exams; a copy of each bundle's reference beside them, so `serve` and
`mammo-node drift` need no bundle. File names are hashes of the source, never received values.
Lines hold scores, times, run ids, AE titles and manufacturer names: no PHI.

**The statistics** (`compare`): the population stability index over the reference's decile bins
and the two-sample Kolmogorov-Smirnov statistic, the usual PSI reading (below 0.1 stable,
0.1-0.25 moderate shift, above 0.25 significant) giving the verdict. `DriftCollector` exports
them at each scrape of `serve` (`node/metrics.py:DRIFT_GAUGES`). Beside them, for each
operating point the bundle declares, the share of the window's exams at or above it against the
share of normal exams it flagged in the bundle's cross-validation (`normal_exam_flag_rate`): the
recall each point would give on the source's own exams (`mammo-node drift`'s second table).

numpy only; nothing here imports torch or pipelines/.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from node.logs import get_logger

log = get_logger("node.drift")

DRIFT_DIR = "drift"  # under spool.dir
REFERENCE_KEY = "reference_scores"  # in a bundle's metadata.json
REFERENCE_BINS = 10  # PSI bins: the reference's deciles
MAX_REFERENCE_SCORES = 10_000  # more out-of-fold scores are kept as this many order statistics
PSI_FLOOR = 1e-4  # an empty bin counts as this fraction (PSI is infinite otherwise)
PSI_MODERATE, PSI_SIGNIFICANT = 0.1, 0.25
DEFAULT_MIN_EXAMS = 50  # fewer exams in a window: too few to judge (the alert rule uses 50 too)
POINTS_KEY = "operating_points"  # in a stored reference: the bundle's points (`reference_for_store`)


# --- the statistics ------------------------------------------------------------------------------
FloatArray = npt.NDArray[np.float64]


def reference_from_scores(scores: Iterable[float], source: str) -> dict[str, Any]:
    """The `reference_scores` of a bundle from its out-of-fold image scores (JSON-ready)."""
    values = np.sort(np.clip(np.asarray(list(scores), dtype=np.float64), 0.0, 1.0))
    if values.size < REFERENCE_BINS:
        raise ValueError(f"a reference needs at least {REFERENCE_BINS} scores, got {values.size}")
    kept = values
    if values.size > MAX_REFERENCE_SCORES:
        kept = np.quantile(values, np.linspace(0.0, 1.0, MAX_REFERENCE_SCORES))
    inner = np.quantile(values, np.arange(1, REFERENCE_BINS) / REFERENCE_BINS)
    edges = np.unique(np.concatenate([[0.0], np.round(inner, 6), [1.0]]))
    return {
        "level": "image",
        "source": source,
        "n": int(values.size),
        "bins": [float(e) for e in edges],
        "fractions": [round(float(f), 6) for f in bin_fractions(values, edges)],
        "scores": [round(float(s), 6) for s in kept],
    }


def normal_exam_flag_rate(metadata: Mapping[str, Any], name: str) -> float | None:
    """The share of normal women's exams a bundle's cross-validation flagged at its operating
    point `name` (1 - `operating_points_detail[name].exam_specificity` of its metadata.json), or
    None when the bundle does not say (bundles before 0.6.1 give only per-image figures)."""
    detail = metadata.get("operating_points_detail")
    try:
        specificity = float(detail[name]["exam_specificity"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return 1.0 - specificity if 0.0 <= specificity <= 1.0 else None


def normal_exams_flagged(metadata: Mapping[str, Any], name: str) -> tuple[int, int] | None:
    """(flagged, normal women's exams) at a bundle's operating point `name`, from its card's
    per-exam table (metadata.json `metrics.subgroups.exams.specificity`), or None when the
    bundle has none."""
    try:
        normal = metadata["metrics"]["subgroups"]["exams"]["specificity"][name]
        return int(normal["of"]) - int(normal["count"]), int(normal["of"])
    except (KeyError, TypeError, ValueError):
        return None


def reference_for_store(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the store keeps of a bundle (its metadata.json): `reference_scores`, with the
    operating points it declares and the share of normal exams each flagged (`POINTS_KEY`:
    name -> threshold, normal_exam_flag_rate); None without a reference."""
    reference = metadata.get(REFERENCE_KEY)
    if not isinstance(reference, Mapping):
        return None
    points: dict[str, dict[str, float | None]] = {}
    declared = metadata.get("operating_points")
    for name, threshold in (declared.items() if isinstance(declared, Mapping) else ()):
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            continue
        points[str(name)] = {"threshold": value,
                             "normal_exam_flag_rate": normal_exam_flag_rate(metadata, str(name))}
    return {**reference, POINTS_KEY: points}


def bin_fractions(scores: Sequence[float] | FloatArray, edges: Sequence[float] | FloatArray
                  ) -> FloatArray:
    """The fraction of `scores` in each bin (the last bin includes its right edge)."""
    values = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    counts, _ = np.histogram(values, bins=np.asarray(edges, dtype=np.float64))
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts), dtype=np.float64)


def psi(expected: Sequence[float] | FloatArray, actual: Sequence[float] | FloatArray) -> float:
    """Population stability index: sum over bins of (actual - expected) * ln(actual / expected)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(reference: Sequence[float] | FloatArray, sample: Sequence[float] | FloatArray
                 ) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    obs = np.sort(np.asarray(sample, dtype=np.float64))
    if ref.size == 0 or obs.size == 0:
        return 0.0
    points = np.concatenate([ref, obs])
    gap = (np.searchsorted(ref, points, side="right") / ref.size
           - np.searchsorted(obs, points, side="right") / obs.size)
    return float(np.max(np.abs(gap)))


def verdict(psi_value: float, exams: int, min_exams: int = DEFAULT_MIN_EXAMS) -> str:
    if exams < min_exams:
        return "too few exams"
    if psi_value >= PSI_SIGNIFICANT:
        return "significant shift"
    if psi_value >= PSI_MODERATE:
        return "moderate shift"
    return "stable"


@dataclass(frozen=True)
class Reference:
    """A bundle's reference distribution, read back from `reference_scores`."""

    edges: FloatArray
    fractions: FloatArray
    scores: FloatArray
    n: int
    # operating point name -> (threshold, share of normal exams it flagged or None); empty for a
    # reference stored before the points were kept
    points: Mapping[str, tuple[float, float | None]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: object) -> Reference | None:
        """None for anything that is not a usable reference (an older bundle has none)."""
        if not isinstance(data, Mapping):
            return None
        try:
            edges = np.asarray(data["bins"], dtype=np.float64)
            fractions = np.asarray(data["fractions"], dtype=np.float64)
            scores = np.asarray(data["scores"], dtype=np.float64)
            n = int(data["n"])
        except (KeyError, TypeError, ValueError):
            return None
        if edges.ndim != 1 or edges.size < 2 or fractions.size != edges.size - 1 or not scores.size:
            return None
        if np.any(np.diff(edges) <= 0):
            return None
        return cls(edges, fractions, np.sort(scores), n, _points(data.get(POINTS_KEY)))


def _points(data: object) -> dict[str, tuple[float, float | None]]:
    points: dict[str, tuple[float, float | None]] = {}
    for name, point in (data.items() if isinstance(data, Mapping) else ()):
        try:
            threshold = float(point["threshold"])
            rate = point.get("normal_exam_flag_rate")
            points[str(name)] = (threshold, None if rate is None else float(rate))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return points


@dataclass(frozen=True)
class PointShare:
    """One operating point of the bundle on a source's window."""

    name: str
    threshold: float
    exams_at_or_above: int
    share: float
    normal_exam_flag_rate: float | None


@dataclass(frozen=True)
class Comparison:
    exams: int
    images: int
    mean_exam_score: float
    mean_image_score: float
    psi: float
    ks: float
    points: tuple[PointShare, ...] = ()

    def verdict(self, min_exams: int = DEFAULT_MIN_EXAMS) -> str:
        return verdict(self.psi, self.exams, min_exams)


def compare(reference: Reference, exams: Sequence[ExamEntry]) -> Comparison:
    """The window's image scores against the reference (PSI over its bins, KS over its scores),
    and its exam scores against each of the bundle's operating points."""
    images = np.asarray([s for e in exams for s in e.images], dtype=np.float64)
    exam_scores = np.asarray([e.exam for e in exams], dtype=np.float64)
    return Comparison(
        exams=len(exams),
        images=int(images.size),
        mean_exam_score=round(float(exam_scores.mean()), 6) if exam_scores.size else 0.0,
        mean_image_score=round(float(images.mean()), 6) if images.size else 0.0,
        psi=round(psi(reference.fractions, bin_fractions(images, reference.edges)), 6)
        if images.size else 0.0,
        ks=round(ks_statistic(reference.scores, images), 6) if images.size else 0.0,
        points=tuple(
            PointShare(name, threshold, int((exam_scores >= threshold).sum()),
                       round(float((exam_scores >= threshold).mean()), 6), rate)
            for name, (threshold, rate) in sorted(reference.points.items(),
                                                  key=lambda item: item[1][0]))
        if exam_scores.size else (),
    )


# --- the rolling store ---------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class SourceKey:
    """Where scores come from, with the model that gave them (the labels of the drift gauges)."""

    model: str
    model_version: str
    calling_ae: str
    manufacturer: str

    @property
    def file_stem(self) -> str:
        text = "\x1f".join((self.model, self.model_version, self.calling_ae, self.manufacturer))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class ExamEntry:
    """One scored run in a source's window."""

    at: float  # wall clock, seconds since the epoch
    run_id: str
    exam: float
    images: tuple[float, ...]


def _reference_stem(model: str, version: str) -> str:
    return hashlib.sha256(f"{model}\x1f{version}".encode()).hexdigest()[:24]


class DriftStore:
    """`<spool>/drift/`: `sources/<hash>.jsonl` (one line per exam, trimmed to `window`),
    `references/<hash>.json` (each bundle's reference, copied by the worker). Writers (the
    worker's pool processes) serialise on `drift/.lock`; readers never lock: a file is replaced
    atomically when trimmed, and a torn last line is skipped."""

    def __init__(self, spool_dir: Path, window: int = 200, max_sources: int = 64) -> None:
        self.root = Path(spool_dir) / DRIFT_DIR
        self.window = window
        self.max_sources = max_sources
        self._saved_references: set[tuple[str, str]] = set()

    @property
    def sources_dir(self) -> Path:
        return self.root / "sources"

    @property
    def references_dir(self) -> Path:
        return self.root / "references"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.sources_dir.mkdir(parents=True, exist_ok=True)
        self.references_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- writing (the worker) ---
    def record(self, key: SourceKey, entry: ExamEntry,
               reference: Mapping[str, Any] | None = None) -> SourceKey:
        """Append one exam to its source's window (and keep the bundle's reference beside it);
        the key it was filed under (a new manufacturer past `max_sources` becomes "other")."""
        with self._locked():
            if reference is not None and (key.model, key.model_version) not in self._saved_references:
                self._save_reference(key.model, key.model_version, reference)
                self._saved_references.add((key.model, key.model_version))
            path = self.sources_dir / f"{key.file_stem}.jsonl"
            if not path.exists() and self._source_count() >= self.max_sources:
                key = SourceKey(key.model, key.model_version, key.calling_ae, "other")
                path = self.sources_dir / f"{key.file_stem}.jsonl"
            line = json.dumps({**asdict(key), **asdict(entry)}, sort_keys=True) + "\n"
            lines = _read_lines(path)
            if any(f'"run_id": {json.dumps(entry.run_id)}' in old for old in lines):
                return key  # the same run again (a retry, a redelivery): counted once
            if len(lines) + 1 > 2 * self.window:  # trim: keep the last `window`, atomically
                kept = lines[len(lines) - self.window + 1:] if self.window > 1 else []
                _replace(path, "".join(kept) + line)
            else:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
        return key

    def _source_count(self) -> int:
        return sum(1 for _ in self.sources_dir.glob("*.jsonl"))

    def _save_reference(self, model: str, version: str, reference: Mapping[str, Any]) -> None:
        path = self.references_dir / f"{_reference_stem(model, version)}.json"
        data = {"model": model, "model_version": version, REFERENCE_KEY: dict(reference)}
        text = json.dumps(data, sort_keys=True)
        try:
            if path.read_text(encoding="utf-8") == text:
                return
        except OSError:
            pass
        _replace(path, text)

    # --- reading (serve's scrape, `mammo-node drift`) ---
    def windows(self) -> list[tuple[SourceKey, list[ExamEntry]]]:
        """Every source with its last `window` exams, oldest first, sorted by source."""
        out: list[tuple[SourceKey, list[ExamEntry]]] = []
        if not self.sources_dir.is_dir():
            return out
        for path in self.sources_dir.glob("*.jsonl"):
            key: SourceKey | None = None
            entries: list[ExamEntry] = []
            for line in _read_lines(path):
                try:
                    data = json.loads(line)
                    key = SourceKey(str(data["model"]), str(data["model_version"]),
                                    str(data["calling_ae"]), str(data["manufacturer"]))
                    entries.append(ExamEntry(float(data["at"]), str(data["run_id"]),
                                             float(data["exam"]),
                                             tuple(float(s) for s in data["images"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash
            if key is not None and entries:
                out.append((key, entries[-self.window:]))
        return sorted(out, key=lambda item: item[0])

    def reference(self, model: str, version: str) -> Reference | None:
        path = self.references_dir / f"{_reference_stem(model, version)}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Reference.from_json(data.get(REFERENCE_KEY) if isinstance(data, dict) else None)

    def comparisons(self) -> list[tuple[SourceKey, list[ExamEntry], Comparison | None]]:
        """Each source's window and its comparison with its bundle's reference (None: no
        reference for that bundle)."""
        references: dict[tuple[str, str], Reference | None] = {}
        out: list[tuple[SourceKey, list[ExamEntry], Comparison | None]] = []
        for key, entries in self.windows():
            bundle = (key.model, key.model_version)
            if bundle not in references:
                references[bundle] = self.reference(*bundle)
            reference = references[bundle]
            out.append((key, entries, compare(reference, entries) if reference else None))
        return out


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line + "\n" for line in text.splitlines() if line.strip()]


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --- serve's gauges ------------------------------------------------------------------------------
class DriftCollector:
    """The drift gauges (node.metrics.DRIFT_GAUGES), computed from the store at each scrape."""

    def __init__(self, store: DriftStore) -> None:
        self.store = store

    def describe(self) -> Iterable[Any]:
        return self._families(())

    def collect(self) -> Iterable[Any]:
        try:
            rows = self.store.comparisons()
        except OSError as error:  # an unreadable store costs the drift gauges, not the scrape
            log.warning("drift_store_unreadable", reason=error.strerror)
            rows = []
        return self._families(rows)

    @staticmethod
    def _families(rows: Iterable[tuple[SourceKey, list[ExamEntry], Comparison | None]]
                  ) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from node.metrics import DRIFT_GAUGES

        families = {name: GaugeMetricFamily(name, text, labels=list(labels))
                    for name, (text, labels) in DRIFT_GAUGES.items()}
        for key, entries, comparison in rows:
            labels = [key.model, key.model_version, key.calling_ae, key.manufacturer]
            families["mammo_score_drift_exams"].add_metric(labels, len(entries))
            if comparison is not None:
                families["mammo_score_drift_psi"].add_metric(labels, comparison.psi)
                families["mammo_score_drift_ks"].add_metric(labels, comparison.ks)
        return list(families.values())

"""`mammo-node shadow report`: the shadow bundle's scores against the live ones.

Every finished run whose record has both live and shadow scores (`RunRecord.shadow`, written by
the worker of a pipeline with a `shadow_model`) is one pair; a study scored several times (a
later run superseding an earlier one) counts once, by its latest run. For each pipeline and pair
of models the report gives: how often both models give the same verdict, each at its own
operating point (and the 2x2 table), the Spearman rank correlation and the mean absolute
difference of the exam scores, the shadow errors, and, with an outcomes CSV (`study_uid,label`,
label 1 = cancer), the AUC of each model on the studies it labels. Pure Python: the report runs
on the receiving host without the scoring stack.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.runs import ModelRef, Scores, read_record
from node.spool import Spool

IMPLICIT = "default"


@dataclass(frozen=True)
class Pair:
    """One study scored by the live and the shadow model."""

    run_id: str
    study_uid: str
    pipeline: str
    live_model: ModelRef
    shadow_model: ModelRef
    live: Scores
    shadow: Scores


@dataclass(frozen=True)
class Collected:
    pairs: list[Pair]
    shadow_errors: dict[str, int]  # by pipeline: runs whose shadow failed


def collect_pairs(spool: Spool, pipeline: str | None = None) -> Collected:
    """The pairs in done/ and failed/, one per (pipeline, study): the latest run's."""
    latest: dict[tuple[str, str], Pair] = {}
    errors: dict[str, int] = {}
    for state in ("done", "failed"):
        for run_id in spool.runs(state):
            record = read_record(spool.state_dir(state) / run_id)
            if record is None or record.shadow is None:
                continue
            name = record.pipeline or IMPLICIT
            if pipeline is not None and name != pipeline:
                continue
            shadow = record.shadow
            if shadow.error is not None:
                errors[name] = errors.get(name, 0) + 1
                continue
            if (record.scores is None or shadow.scores is None or record.model is None
                    or shadow.model is None):
                continue
            key = (name, record.study_uid)
            if key in latest and latest[key].run_id > run_id:
                continue
            latest[key] = Pair(run_id, record.study_uid, name, record.model, shadow.model,
                               record.scores, shadow.scores)
    return Collected(sorted(latest.values(), key=lambda p: p.run_id), errors)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when undefined (fewer
    than two pairs, or one side constant)."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """ROC AUC (Mann-Whitney, ties counted half); None without both classes."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not positives or not negatives:
        return None
    ranks = _ranks([*positives, *negatives])
    rank_sum = sum(ranks[: len(positives)])
    u = rank_sum - len(positives) * (len(positives) + 1) / 2
    return u / (len(positives) * len(negatives))


class OutcomesError(ValueError):
    """The outcomes CSV cannot be used (one line naming the row and the problem)."""


def read_outcomes(path: Path) -> dict[str, int]:
    """`study_uid,label` rows (a header row naming those columns; label 0 or 1)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise OutcomesError(f"{path}: cannot read: {error.strerror}") from None
    outcomes: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        uid, label = (row.get("study_uid") or "").strip(), (row.get("label") or "").strip()
        if not uid or label not in ("0", "1"):
            raise OutcomesError(f"{path}: row {number}: needs study_uid and label 0 or 1 "
                                "(header: study_uid,label)")
        outcomes[uid] = int(label)
    return outcomes


def compare(pairs: Iterable[Pair], outcomes: Mapping[str, int] | None = None
            ) -> list[dict[str, object]]:
    """One comparison per (pipeline, live model, shadow model)."""
    groups: dict[tuple[str, str, str], list[Pair]] = {}
    for pair in pairs:
        key = (pair.pipeline, f"{pair.live_model.name} {pair.live_model.version}",
               f"{pair.shadow_model.name} {pair.shadow_model.version}")
        groups.setdefault(key, []).append(pair)
    reports: list[dict[str, object]] = []
    for (pipeline, live_model, shadow_model), group in sorted(groups.items()):
        live = [p.live.exam for p in group]
        shadow = [p.shadow.exam for p in group]
        table = {"both_suspicious": 0, "live_only": 0, "shadow_only": 0, "neither": 0}
        for pair in group:
            cell = {(True, True): "both_suspicious", (True, False): "live_only",
                    (False, True): "shadow_only", (False, False): "neither"}[
                (pair.live.suspicious, pair.shadow.suspicious)]
            table[cell] += 1
        report: dict[str, object] = {
            "pipeline": pipeline,
            "live_model": live_model,
            "shadow_model": shadow_model,
            "studies": len(group),
            "agreement": (table["both_suspicious"] + table["neither"]) / len(group),
            "verdicts": table,
            "exam_spearman": spearman(live, shadow),
            "exam_mean_abs_diff": sum(abs(a - b) for a, b in zip(live, shadow, strict=True))
            / len(group),
        }
        if outcomes is not None:
            labelled = [p for p in group if p.study_uid in outcomes]
            labels = [outcomes[p.study_uid] for p in labelled]
            report["labelled_studies"] = len(labelled)
            report["positives"] = sum(labels)
            report["live_auc"] = auc([p.live.exam for p in labelled], labels)
            report["shadow_auc"] = auc([p.shadow.exam for p in labelled], labels)
        reports.append(report)
    return reports


def format_report(reports: Sequence[Mapping[str, object]], errors: Mapping[str, int]
                  ) -> list[str]:
    """The report as lines for a person."""
    def number(value: object) -> str:
        return "n/a" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]

    lines = []
    for report in reports:
        table = report["verdicts"]
        assert isinstance(table, dict)
        lines += [
            f"pipeline {report['pipeline']}: live {report['live_model']} vs shadow "
            f"{report['shadow_model']}, {report['studies']} studies",
            f"  agreement (verdict at each model's operating point): "
            f"{number(report['agreement'])} (both suspicious {table['both_suspicious']}, "
            f"live only {table['live_only']}, shadow only {table['shadow_only']}, "
            f"neither {table['neither']})",
            f"  exam scores: Spearman {number(report['exam_spearman'])}, mean absolute "
            f"difference {number(report['exam_mean_abs_diff'])}",
        ]
        if "live_auc" in report:
            lines.append(f"  outcomes: {report['labelled_studies']} labelled studies "
                         f"({report['positives']} positive): AUC live "
                         f"{number(report['live_auc'])}, shadow {number(report['shadow_auc'])}")
    for pipeline, count in sorted(errors.items()):
        lines.append(f"pipeline {pipeline}: {count} run(s) with a shadow error (see their "
                     "record.json `shadow.error`)")
    return lines

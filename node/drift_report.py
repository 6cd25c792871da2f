"""`mammo-node drift --out DIR`: the drift of every source as a table and a plot.

Reads the rolling store (node/drift.py) and writes `drift.json` (machine-readable), `report.md`
(one row per source: exams and images in the window, mean exam and image score, PSI, KS and the
verdict by the usual PSI reading; then, per source and operating point the bundle declares, the
share of the window's exams at or above the point beside the share of normal exams it flagged in
the bundle's cross-validation) and `drift.png` (each source's image-score histogram over the
reference's bins beside the reference's). matplotlib is imported inside `write_plot` only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from node.drift import (
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    Comparison,
    DriftStore,
    ExamEntry,
    Reference,
    SourceKey,
    bin_fractions,
)
from node.settings import Settings

MAX_PLOTTED_SOURCES = 12


def report_rows(items: Sequence[tuple[SourceKey, list[ExamEntry], Comparison | None]],
                min_exams: int) -> list[dict[str, Any]]:
    rows = []
    for key, entries, comparison in items:
        row: dict[str, Any] = {**asdict(key), "first_exam_at": entries[0].at,
                               "last_exam_at": entries[-1].at}
        if comparison is None:
            row.update(exams=len(entries), images=sum(len(e.images) for e in entries),
                       psi=None, ks=None, verdict="no reference in the bundle")
        else:
            row.update(asdict(comparison), verdict=comparison.verdict(min_exams))
        rows.append(row)
    return rows


def _fmt(value: object, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict[str, Any]], window: int, min_exams: int) -> str:
    lines = [
        "# Score drift per source",
        "",
        f"Each source's last {window} exams (image scores) against its model bundle's reference "
        "(the out-of-fold image scores of its cross-validation). PSI over the reference's decile "
        f"bins: below {PSI_MODERATE} stable, {PSI_MODERATE}–{PSI_SIGNIFICANT} moderate shift, "
        f"{PSI_SIGNIFICANT} and above significant shift; fewer than {min_exams} exams: too few "
        "to judge. KS: the largest gap between the two cumulative distributions.",
        "",
        "| model | calling AE | manufacturer | exams | images | mean exam score | "
        "mean image score | PSI | KS | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {r['model_version']} | {r['calling_ae']} | {r['manufacturer']} | "
            f"{r['exams']} | {r['images']} | {_fmt(r.get('mean_exam_score'))} | "
            f"{_fmt(r.get('mean_image_score'))} | {_fmt(r['psi'])} | {_fmt(r['ks'])} | "
            f"{r['verdict']} |")
    if not rows:
        lines.append("| (no scored exam in the store yet) | | | | | | | | | |")
    lines += _point_lines(rows)
    lines += ["", "![image-score histograms against the reference](drift.png)", ""]
    return "\n".join(lines)


def _point_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The second table: what each operating point would flag of each source's window."""
    shown = [(r, p) for r in rows for p in r.get("points") or ()]
    if not shown:
        return []
    lines = [
        "",
        "## Exams each operating point flags, per source",
        "",
        "The share of the window's exams whose exam score is at or above each operating point the "
        "bundle declares (the verdict `suspicious` at that point), beside the share of normal "
        "women's exams that point flagged in the bundle's cross-validation (its model card's "
        "per-exam table). In screening almost every exam is normal, so a source's share should "
        "sit near the bundle's; choosing `model.operating_point`, a site reads here the recall "
        "each point would give on its own exams.",
        "",
        "| model | calling AE | manufacturer | exams | operating point | threshold | "
        "exams at or above | share | bundle's normal exams flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, p in shown:
        expected = p["normal_exam_flag_rate"]
        lines.append(
            f"| {r['model']} {r['model_version']} | {r['calling_ae']} | {r['manufacturer']} | "
            f"{r['exams']} | {p['name']} | {p['threshold']:.3f} | {p['exams_at_or_above']} | "
            f"{p['share']:.3f} | {'–' if expected is None else f'{expected:.3f}'} |")
    return lines


def write_plot(path: Path, store: DriftStore,
               items: Sequence[tuple[SourceKey, list[ExamEntry], Comparison | None]]) -> None:
    """One panel per source (at most MAX_PLOTTED_SOURCES): density of its image scores over the
    reference's bins, the reference's beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [item for item in items if item[2] is not None][:MAX_PLOTTED_SOURCES]
    columns = min(3, max(1, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.ravel()[len(shown):]:
        axis.axis("off")
    if not shown:
        axes[0][0].text(0.5, 0.5, "no scored exam with a reference yet", ha="center", va="center")
    for axis, (key, entries, comparison) in zip(axes.ravel(), shown, strict=False):
        reference = store.reference(key.model, key.model_version)
        assert reference is not None and comparison is not None
        _panel(axis, reference, [s for e in entries for s in e.images])
        axis.set_title(f"{key.calling_ae} / {key.manufacturer}\n{key.model} {key.model_version}: "
                       f"PSI {comparison.psi:.3f}, KS {comparison.ks:.3f}, n={comparison.exams}",
                       fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _panel(axis: Any, reference: Reference, images: Sequence[float]) -> None:
    widths = np.diff(reference.edges)
    observed = bin_fractions(images, reference.edges)
    axis.stairs(reference.fractions / widths, reference.edges, fill=True, alpha=0.35,
                color="grey", label="reference (out-of-fold)")
    axis.stairs(observed / widths, reference.edges, color="tab:red", linewidth=1.5,
                label="this source")
    axis.set_xlim(0, 1)
    axis.set_xlabel("image score", fontsize=8)
    axis.set_ylabel("density", fontsize=8)
    axis.legend(fontsize=7)


def write_report(settings: Settings, out_dir: Path) -> list[dict[str, Any]]:
    """drift.json, report.md and drift.png in `out_dir`; the rows of the table."""
    store = DriftStore(settings.spool.dir, settings.drift.window, settings.drift.max_sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = store.comparisons()
    rows = report_rows(items, settings.drift.min_exams)
    (out_dir / "drift.json").write_text(json.dumps(
        {"window": settings.drift.window, "min_exams": settings.drift.min_exams,
         "psi_thresholds": {"moderate": PSI_MODERATE, "significant": PSI_SIGNIFICANT},
         "sources": rows}, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(
        markdown(rows, settings.drift.window, settings.drift.min_exams), encoding="utf-8")
    write_plot(out_dir / "drift.png", store, items)
    return rows

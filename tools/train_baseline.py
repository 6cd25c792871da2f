"""Train the default model on mini-MIAS and write the bundle (model.ts, metadata.json, README.md).

Whole-image labels alone teach a from-scratch CNN nothing on 322 films; the lesion circles are
the signal. So this is a small segmentation network trained on soft circle masks (weak
supervision), whose sigmoid output is the heatmap and whose image score is the peak of the
smoothed heatmap. Evaluation is honest: 5-fold cross-validation grouped by woman (left/right
pair), stratified, early stopping on an inner validation split of the training folds only.

    .venv/bin/python -m tools.train_baseline [--data ../shared/data/mias] [--out models/mias-baseline]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
)
from PIL import Image

from pipelines.model import file_sha256
from pipelines.preprocess import build_preprocess

ROOT = Path(__file__).resolve().parents[1]
NAME = "mias-baseline"
VERSION = "0.1.0"
MIAS_SIZE = 1024
POOL = 7  # heatmap smoothing window (model cells) before taking the peak as the image score


@dataclass
class Case:
    ref: str
    pair: int
    abnormal: bool
    malignant: bool
    lesions: list[tuple[float, float, float]] = field(default_factory=list)  # row, col, radius (px)
    flipped: bool = False


def parse_info(path: Path) -> list[Case]:
    """Info.txt: one row per abnormality; y has its origin at the bottom-left (row = 1024 - y)."""
    cases: dict[str, Case] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("mdb") or len(parts) < 3:
            continue
        ref = parts[0]
        number = int(ref[3:])
        case = cases.setdefault(ref, Case(ref, (number + 1) // 2, False, False))
        if parts[2] != "NORM":
            case.abnormal = True
            case.malignant = case.malignant or (len(parts) > 3 and parts[3] == "M")
            if len(parts) >= 7:
                x, y, radius = float(parts[4]), float(parts[5]), float(parts[6])
                case.lesions.append((MIAS_SIZE - y, x, radius))
    return [cases[k] for k in sorted(cases)]


class Heatmapper(torch.nn.Module):
    """Logit map -> (probability (B,), heatmap (B, 1, H, W)): the bundle's TorchScript contract."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        pooled = F.avg_pool2d(logits, POOL, stride=1, padding=POOL // 2, count_include_pad=False)
        score = pooled.flatten(1).max(dim=1).values
        return torch.sigmoid(score), torch.sigmoid(logits)


def build_net(features: tuple[int, ...]) -> Heatmapper:
    return Heatmapper(BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=features,
                                act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                                norm=("instance", {"affine": True}), dropout=0.1))


def metadata_template(size: int) -> dict[str, Any]:
    return {
        "format_version": 1,
        "name": NAME,
        "version": VERSION,
        "input": {
            "height": size, "width": size, "channels": 1,
            "orientation": "chest_wall_left",
            "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5,
                          "description": "area resize to height x width, then percentiles "
                                         "0.5-99.5 scaled to [0, 1], clipped"},
        },
        "output": {
            "contract": "forward(x: float32 (B,1,H,W)) -> (probability (B,), heatmap (B,1,H,W))",
            "score": "probability of an abnormality needing work-up (benign or malignant "
                     "lesion) versus normal",
            "heatmap": "per-cell likelihood of lesion, [0, 1], on the input grid",
        },
    }


def load_images(data: Path, cases: list[Case], preprocess: Any) -> torch.Tensor:
    """Preprocessed (N, 1, H, W) images, oriented chest wall left (annotations flipped too)."""
    images = []
    for case in cases:
        pixels = np.asarray(Image.open(data / f"{case.ref}.png"), dtype=np.float32)
        band = pixels.shape[1] // 5
        case.flipped = bool(pixels[:, -band:].mean() > pixels[:, :band].mean())
        if case.flipped:
            pixels = pixels[:, ::-1]
            case.lesions = [(r, MIAS_SIZE - 1 - c, rad) for r, c, rad in case.lesions]
        images.append(preprocess(pixels))
    return torch.stack(images)


def lesion_masks(cases: list[Case], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft circle masks on the model grid, and a per-image weight (0 where the truth is unknown:
    abnormal images whose rows give no centre)."""
    scale = size / MIAS_SIZE
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    masks = np.zeros((len(cases), 1, size, size), np.float32)
    known = np.ones(len(cases), np.float32)
    for index, case in enumerate(cases):
        if case.abnormal and not case.lesions:
            known[index] = 0.0
        for row, col, radius in case.lesions:
            r, c, rad = row * scale, col * scale, max(radius * scale, 2.0)
            distance2 = (rows - r) ** 2 + (cols - c) ** 2
            masks[index, 0] = np.maximum(masks[index, 0], np.exp(-distance2 / (2 * (rad / 1.5) ** 2)))
    return torch.from_numpy(masks), torch.from_numpy(known)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    labels = labels.astype(bool)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                     seed: int, rounds: int = 2000) -> tuple[float, float]:
    """95 % CI resampling women (pairs), not images, so a woman's two breasts move together."""
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    index_by_group = {g: np.flatnonzero(groups == g) for g in unique}
    values = []
    for _ in range(rounds):
        chosen = rng.choice(unique, size=len(unique), replace=True)
        idx = np.concatenate([index_by_group[g] for g in chosen])
        value = auc(labels[idx], scores[idx])
        if not np.isnan(value):
            values.append(value)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def grouped_folds(cases: list[Case], folds: int, seed: int) -> list[np.ndarray]:
    """Pair ids split into `folds` groups, stratified by whether the woman has an abnormality."""
    rng = np.random.default_rng(seed)
    pairs = sorted({c.pair for c in cases})
    abnormal_pairs = [p for p in pairs if any(c.abnormal for c in cases if c.pair == p)]
    normal_pairs = [p for p in pairs if p not in set(abnormal_pairs)]
    assignment: dict[int, int] = {}
    for group in (abnormal_pairs, normal_pairs):
        shuffled = list(rng.permutation(group))
        for position, pair in enumerate(shuffled):
            assignment[int(pair)] = position % folds
    pair_of = np.array([c.pair for c in cases])
    return [np.flatnonzero(np.isin(pair_of, [p for p, f in assignment.items() if f == k]))
            for k in range(folds)]


AUGMENT = Compose([
    RandFlipd(keys=["image", "mask"], spatial_axis=0, prob=0.5),
    RandAffined(keys=["image", "mask"], prob=0.7, rotate_range=0.15, scale_range=0.1,
                translate_range=(8, 8), padding_mode="zeros", mode=("bilinear", "bilinear")),
    RandScaleIntensityd(keys=["image"], factors=0.15, prob=0.5),
    RandAdjustContrastd(keys=["image"], gamma=(0.7, 1.5), prob=0.5),
])


def _augment(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_images, out_masks = [], []
    for image, mask in zip(images, masks, strict=True):
        sample = AUGMENT({"image": image, "mask": mask})
        out_images.append(torch.as_tensor(sample["image"]))
        out_masks.append(torch.as_tensor(sample["mask"]))
    return torch.stack(out_images).float(), torch.stack(out_masks).float()


def predict(model: Heatmapper, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probabilities, heatmaps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            probability, heatmap = model(images[start:start + 16])
            probabilities.append(probability.numpy())
            heatmaps.append(heatmap[:, 0].numpy())
    return np.concatenate(probabilities), np.concatenate(heatmaps)


@dataclass
class TrainConfig:
    epochs: int
    patience: int
    batch_size: int
    lr: float
    features: tuple[int, ...]
    seed: int
    min_epochs: int = 1  # the validation AUC of the first epochs on ~45 images is noise


def train_model(config: TrainConfig, images: torch.Tensor, masks: torch.Tensor,
                known: torch.Tensor, labels: torch.Tensor, train_idx: np.ndarray,
                val_idx: np.ndarray | None, fixed_epochs: int | None = None,
                log_prefix: str = "") -> tuple[Heatmapper, int, float]:
    """Train; early stopping on validation AUC when val_idx is given, else `fixed_epochs`."""
    torch.manual_seed(config.seed)
    AUGMENT.set_random_state(seed=config.seed)  # MONAI's random transforms have their own state
    model = build_net(config.features)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    epochs = fixed_epochs or config.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    rng = np.random.default_rng(config.seed)
    train_labels = labels[train_idx]
    positives = float(train_labels.sum())
    # Class balance: abnormal images drawn as often as normal ones.
    weights = np.where(train_labels.numpy() > 0, 0.5 / max(positives, 1),
                       0.5 / max(len(train_idx) - positives, 1))
    weights = weights / weights.sum()
    best_state, best_auc, best_epoch, stale = None, -1.0, 0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.time()
        order = rng.choice(train_idx, size=len(train_idx), replace=True, p=weights)
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            x, y_mask = _augment(images[batch], masks[batch])
            logits = model.net(x)
            pixel_loss = F.binary_cross_entropy_with_logits(
                logits, y_mask, pos_weight=torch.tensor(20.0), reduction="none"
            ).mean(dim=(1, 2, 3))
            pixel_loss = (pixel_loss * known[batch]).sum() / known[batch].sum().clamp(min=1)
            pooled = F.avg_pool2d(logits, POOL, stride=1, padding=POOL // 2,
                                  count_include_pad=False).flatten(1).max(dim=1).values
            image_loss = F.binary_cross_entropy_with_logits(pooled, labels[batch])
            loss = pixel_loss + 0.5 * image_loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        scheduler.step()
        message = f"{log_prefix}epoch {epoch:2d}/{epochs} loss {np.mean(losses):.4f}"
        if val_idx is not None and epoch >= config.min_epochs:
            val_scores, _ = predict(model, images[val_idx])
            val_auc = auc(labels[val_idx].numpy(), val_scores)
            message += f" val AUC {val_auc:.3f}"
            if val_auc > best_auc:
                best_auc, best_epoch, stale = val_auc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        print(f"{message} ({time.time() - started:.1f} s)", flush=True)
        if val_idx is not None and stale >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epochs
    return model, best_epoch, best_auc


def hit_rate(cases: list[Case], heatmaps: np.ndarray, size: int) -> tuple[int, int]:
    """Abnormal images with a centre whose heatmap peak falls inside one of their circles."""
    scale = size / MIAS_SIZE
    hits = total = 0
    for case, heatmap in zip(cases, heatmaps, strict=True):
        if not case.lesions:
            continue
        total += 1
        row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        centre_r, centre_c = (row + 0.5) / scale, (col + 0.5) / scale
        if any((centre_r - r) ** 2 + (centre_c - c) ** 2 <= max(rad, 1.5 / scale) ** 2
               for r, c, rad in case.lesions):
            hits += 1
    return hits, total


def operating_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Thresholds chosen on out-of-fold predictions: Youden-balanced and sensitivity >= 0.9."""
    thresholds = np.unique(scores)
    best_youden, balanced = -1.0, float(thresholds[0])
    high_sensitivity = float(thresholds[0])
    for threshold in thresholds:
        predicted = scores >= threshold
        sensitivity = float(predicted[labels == 1].mean())
        specificity = float((~predicted[labels == 0]).mean())
        if sensitivity + specificity - 1 > best_youden:
            best_youden, balanced = sensitivity + specificity - 1, float(threshold)
        if sensitivity >= 0.9:
            high_sensitivity = float(threshold)
    result = {}
    for name, threshold in (("balanced", balanced), ("high_sensitivity", high_sensitivity)):
        predicted = scores >= threshold
        result[name] = {
            "threshold": round(threshold, 6),
            "sensitivity": round(float(predicted[labels == 1].mean()), 4),
            "specificity": round(float((~predicted[labels == 0]).mean()), 4),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mias")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / NAME)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--min-epochs", type=int, default=1,
                        help="first epoch at which validation may pick the best model")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.data / "Info.txt").is_file():
        print(f"mini-MIAS not found at {args.data} (Info.txt missing)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.time()
    config = TrainConfig(args.epochs, args.patience, args.batch_size, args.lr,
                         (8, 16, 32, 64, 96, 8), args.seed, min_epochs=args.min_epochs)
    metadata = metadata_template(args.size)
    cases = parse_info(args.data / "Info.txt")
    images = load_images(args.data, cases, build_preprocess(metadata))
    masks, known = lesion_masks(cases, args.size)
    labels = torch.tensor([float(c.abnormal) for c in cases])
    malignant = np.array([c.malignant for c in cases])
    groups = np.array([c.pair for c in cases])
    print(f"{len(cases)} images, {int(labels.sum())} abnormal ({int(malignant.sum())} malignant), "
          f"{len(set(groups))} women; {args.folds}-fold CV grouped by woman", flush=True)

    folds = grouped_folds(cases, args.folds, args.seed)
    oof_scores = np.zeros(len(cases))
    oof_heatmaps = np.zeros((len(cases), args.size, args.size), np.float32)
    best_epochs, fold_aucs = [], []
    for k, test_idx in enumerate(folds):
        train_pool = np.setdiff1d(np.arange(len(cases)), test_idx)
        inner = grouped_folds([cases[i] for i in train_pool], 6, args.seed + k + 1)[0]
        val_idx = train_pool[inner]
        train_idx = np.setdiff1d(train_pool, val_idx)
        assert not set(groups[test_idx]) & set(groups[train_pool]), "a woman in two folds"
        model, best_epoch, val_auc = train_model(config, images, masks, known, labels, train_idx,
                                                 val_idx, log_prefix=f"fold {k + 1} ")
        scores, heatmaps = predict(model, images[test_idx])
        oof_scores[test_idx], oof_heatmaps[test_idx] = scores, heatmaps
        fold_auc = auc(labels[test_idx].numpy(), scores)
        fold_aucs.append(fold_auc)
        best_epochs.append(best_epoch)
        print(f"fold {k + 1}: best epoch {best_epoch} (val AUC {val_auc:.3f}), "
              f"test AUC {fold_auc:.3f}", flush=True)

    y = labels.numpy().astype(int)
    cv_auc = auc(y, oof_scores)
    cv_ci = bootstrap_auc_ci(y, oof_scores, groups, args.seed)
    malignant_auc = auc(malignant.astype(int), oof_scores)
    malignant_ci = bootstrap_auc_ci(malignant.astype(int), oof_scores, groups, args.seed)
    hits, with_centre = hit_rate(cases, oof_heatmaps, args.size)
    points = operating_points(y, oof_scores)
    final_epochs = int(np.median(best_epochs))
    print(f"out-of-fold AUC {cv_auc:.3f} (95% CI {cv_ci[0]:.3f}-{cv_ci[1]:.3f}); malignant vs "
          f"rest {malignant_auc:.3f}; hit rate {hits}/{with_centre}; final fit {final_epochs} "
          "epochs on all images", flush=True)

    final, _, _ = train_model(config, images, masks, known, labels, np.arange(len(cases)), None,
                              fixed_epochs=final_epochs, log_prefix="final ")
    final.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    traced = torch.jit.trace(final, torch.zeros(1, 1, args.size, args.size))
    model_path = args.out / "model.ts"
    traced.save(str(model_path))
    wall_s = time.time() - started
    metrics = {
        "split": f"{args.folds}-fold cross-validation grouped by woman (left/right pair), "
                 "stratified by abnormality; early stopping on an inner validation split of "
                 "the training folds; out-of-fold predictions pooled",
        "normal_vs_abnormal_auc": round(cv_auc, 4),
        "normal_vs_abnormal_auc_ci95": [round(cv_ci[0], 4), round(cv_ci[1], 4)],
        "malignant_vs_rest_auc": round(malignant_auc, 4),
        "malignant_vs_rest_auc_ci95": [round(malignant_ci[0], 4), round(malignant_ci[1], 4)],
        "fold_aucs": [round(a, 4) for a in fold_aucs],
        "lesion_hit_rate": round(hits / max(with_centre, 1), 4),
        "lesion_hits": [hits, with_centre],
        "ci_method": "bootstrap over women, 2000 rounds, percentile",
    }
    command = "python -m tools.train_baseline " + " ".join(argv if argv is not None else sys.argv[1:])
    metadata.update({
        "operating_points": {name: p["threshold"] for name, p in points.items()},
        "operating_points_detail": points,
        "metrics": metrics,
        "training": {
            "data": "mini-MIAS (322 scanned-film MLO mammograms, 200 um, 8-bit; research licence)",
            "images": len(cases), "abnormal": int(labels.sum()), "malignant": int(malignant.sum()),
            "architecture": f"MONAI BasicUNet features {list(config.features)}, instance norm; "
                            f"score = max of {POOL}x{POOL}-smoothed logit map",
            "supervision": "soft lesion-circle masks (pos_weight 20) + image label on the score",
            "epochs_final": final_epochs, "seed": args.seed, "command": command.strip(),
            "wall_time_s": round(wall_s, 1), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "model_sha256": file_sha256(model_path),
    })
    (args.out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(metadata))
    print(f"bundle written to {args.out} in {wall_s / 60:.1f} min", flush=True)
    return 0


def _verdict(low: float, high: float) -> str:
    """Say plainly when the measured AUC does not exclude chance."""
    if low <= 0.5 <= high:
        return ("**The 95 % CI includes 0.5: this model has not shown that it can tell abnormal "
                "from normal images.** It is a working, honestly measured baseline for the "
                "pipeline, not a useful detector.")
    return ""


def model_card(metadata: dict[str, Any]) -> str:
    m, t, p = metadata["metrics"], metadata["training"], metadata["operating_points_detail"]
    lo, hi = m["normal_vs_abnormal_auc_ci95"]
    hits = f"{m['lesion_hits'][0]}/{m['lesion_hits'][1]}"
    mlo, mhi = m["malignant_vs_rest_auc_ci95"]
    return f"""# Model card: {metadata['name']} {metadata['version']}

**Research use only, not for diagnosis.** Trained on a small public research database of
scanned film; it has never been validated on full-field digital mammography or on a screening
population.

## What it does
Input: one mammogram, oriented chest wall left, resized to {metadata['input']['height']} x
{metadata['input']['width']} (area), intensities scaled by the 0.5–99.5 percentiles.
Outputs: {metadata['output']['score']}; and a heatmap of lesion likelihood (the SEG content).
The node reports per view, per breast (max of its views) and per exam (max of breasts).

## Data
mini-MIAS (Mammographic Image Analysis Society): {t['images']} scanned-film MLO mammograms of
161 women, 1024 x 1024, 200 µm pixels, 8-bit; {t['abnormal']} abnormal images ({t['malignant']}
malignant). Licence: research use only; no renting, leasing or selling. Citation: Suckling J. et
al., "The Mammographic Image Analysis Society Digital Mammogram Database", Excerpta Medica
International Congress Series 1069, 1994, pp. 375–378.

## How it was trained
{t['architecture']}. Supervision: {t['supervision']}. Augmentation: vertical flips, small
rotations, scales and shifts, intensity scale and gamma; abnormal and normal images sampled
equally. Final model: all images, {t['epochs_final']} epochs (median best epoch of the folds).

## Measured performance (exactly as measured; never tuned on test folds)
Split: {m['split']}.

| metric | value | 95 % CI |
|---|---|---|
| normal vs abnormal AUC | {m['normal_vs_abnormal_auc']:.3f} | {lo:.3f}–{hi:.3f} |
| malignant vs rest AUC | {m['malignant_vs_rest_auc']:.3f} | {mlo:.3f}–{mhi:.3f} |
| lesion hit rate (heatmap peak inside the annotated circle) | {m['lesion_hit_rate']:.3f} ({hits}) | |

Per-fold AUC: {', '.join(f'{a:.3f}' for a in m['fold_aucs'])}. CIs: {m['ci_method']}.
{_verdict(lo, hi)}

Operating points (chosen on the out-of-fold predictions):

| name | threshold | sensitivity | specificity |
|---|---|---|---|
""" + "".join(
        f"| {name} | {v['threshold']:.4f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} |\n"
        for name, v in p.items()
    ) + f"""
The node reports "suspicious" at or above the **balanced** threshold.

## Limits
- Research model: small data (322 images), scanned film, MLO only; CC views and digital images
  go through the same preprocessing but were never seen in training.
- Wide confidence intervals: about 23 abnormal images per test fold.
- The heatmap is coarse ({metadata['input']['height']} x {metadata['input']['width']} grid, ≈
  {200 * 1024 / metadata['input']['height']:.0f} µm per cell on MIAS) and resized to the source.

## Retrain
`make train` (or `{t['command']}`) with mini-MIAS at `../shared/data/mias`; wall time here
{t['wall_time_s'] / 60:.1f} min on {t['machine']} (torch {t['torch']}).
"""


if __name__ == "__main__":
    raise SystemExit(main())

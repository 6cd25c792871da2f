"""Train the default model on mini-MIAS and write the bundle (model.ts, metadata.json, README.md).

Whole-image labels alone teach a from-scratch CNN nothing on 322 films; the lesion circles are
the signal. So this is a small fully convolutional segmentation network trained on patches with
soft circle masks as targets; its sigmoid output is the heatmap and the peak of the smoothed
heatmap is the image score. Batch norm (fixed statistics at inference) keeps the network a
fixed local function, so what it learns on patches holds on the whole image it scores.

Evaluation is honest: 5-fold cross-validation grouped by woman (left/right pair), stratified,
with a fixed training schedule decided before looking at any held-out result (no early stopping,
nothing tuned on test folds); then the final model is trained on all images with the same
schedule, and the operating points are chosen on the out-of-fold predictions.

    .venv/bin/python -m tools.train_baseline [--data ../shared/data/mias] [--out models/mias-baseline]
"""

from __future__ import annotations

import argparse
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
from PIL import Image

from pipelines.model import file_sha256, load_bundle
from pipelines.preprocess import build_preprocess

ROOT = Path(__file__).resolve().parents[1]
NAME = "mias-baseline"
VERSION = "0.1.0"
MIAS_SIZE = 1024
FEATURES = (8, 16, 32, 64, 96, 8)
POOL = 5  # heatmap smoothing window (model cells) before its peak becomes the image score
POS_WEIGHT = 5.0  # lesion pixels are ~1 % of a patch
CONTRAST_SCALES = (9, 25)  # box blurs (model cells) whose difference to the image is fed too


@dataclass
class Case:
    ref: str
    pair: int  # one woman: mdb001/mdb002 -> 1
    abnormal: bool
    malignant: bool
    lesions: list[tuple[float, float, float]] = field(default_factory=list)  # row, col, radius px
    flipped: bool = False


def parse_info(path: Path) -> list[Case]:
    """Info.txt: one row per abnormality; y has its origin at the bottom-left (row = 1024 - y)."""
    cases: dict[str, Case] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("mdb"):
            continue
        ref = parts[0]
        case = cases.setdefault(ref, Case(ref, (int(ref[3:]) + 1) // 2, False, False))
        if parts[2] != "NORM":
            case.abnormal = True
            case.malignant = case.malignant or (len(parts) > 3 and parts[3] == "M")
            if len(parts) >= 7:
                x, y, radius = float(parts[4]), float(parts[5]), float(parts[6])
                case.lesions.append((MIAS_SIZE - y, x, radius))
    return [cases[k] for k in sorted(cases)]


def chest_wall_on_right(pixels: np.ndarray) -> bool:
    """The chest wall side carries more tissue: compare the two halves over the middle rows.

    The middle rows skip the film labels in the corners; on mini-MIAS this agrees with the
    left/right pairing of Info.txt on all but a few films filled edge to edge by a large breast.
    """
    rows, cols = pixels.shape
    middle = pixels[rows // 4: 3 * rows // 4]
    return bool(middle[:, cols // 2:].mean() > middle[:, : cols // 2].mean())


class Heatmapper(torch.nn.Module):
    """Image -> (probability (B,), heatmap (B, 1, H, W)): the bundle's TorchScript contract.

    Besides the image, the network sees its local contrast at two scales (image minus a box
    blur): a mass is brighter than its surroundings, dense tissue is bright everywhere. Giving
    that difference directly saves the small network (and the CPU budget) from learning it.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heatmap = torch.sigmoid(self.net(contrast_channels(x)))
        return image_score(heatmap), heatmap


def contrast_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1 + len(CONTRAST_SCALES), H, W): the image and x - local mean."""
    channels = [x]
    for size in CONTRAST_SCALES:
        local = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
        channels.append(x - local)
    return torch.cat(channels, dim=1)


def image_score(heatmap: torch.Tensor) -> torch.Tensor:
    """A smooth max: the peak of the POOL x POOL mean, so one hot cell alone does not decide."""
    pooled = F.avg_pool2d(heatmap, POOL, stride=1, padding=POOL // 2, count_include_pad=False)
    return pooled.flatten(1).max(dim=1).values


def build_net() -> Heatmapper:
    return Heatmapper(BasicUNet(spatial_dims=2, in_channels=1 + len(CONTRAST_SCALES),
                                out_channels=1, features=FEATURES,
                                act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                                norm=("batch", {}), dropout=0.0))


def metadata_template(size: int) -> dict[str, Any]:
    return {
        "format_version": 1,
        "name": NAME,
        "version": VERSION,
        "input": {
            "height": size, "width": size, "channels": 1,
            "orientation": "chest_wall_left",
            "photometric": "MONOCHROME2 (bright = dense)",
            "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5,
                          "description": "whole image area-resized to height x width (no crop), "
                                         "then percentiles 0.5-99.5 scaled to [0, 1], clipped"},
        },
        "output": {
            "contract": "forward(x: float32 (B,1,H,W)) -> (probability (B,), heatmap (B,1,H,W))",
            "heatmap_size": [size, size],
            "score": "probability of an abnormality needing work-up, benign or malignant "
                     "(a score in [0, 1]; not calibrated to a screening population)",
            "heatmap": "per-cell lesion likelihood in [0, 1] on the input grid",
        },
    }


def load_images(data: Path, cases: list[Case], preprocess: Any) -> torch.Tensor:
    """Preprocessed (N, 1, H, W) images, oriented chest wall left (annotations mirrored too)."""
    images = []
    for case in cases:
        pixels = np.asarray(Image.open(data / f"{case.ref}.png"), dtype=np.float32)
        case.flipped = chest_wall_on_right(pixels)
        if case.flipped:
            pixels = np.ascontiguousarray(pixels[:, ::-1])
            cols = pixels.shape[1]
            case.lesions = [(r, cols - 1 - c, rad) for r, c, rad in case.lesions]
        images.append(preprocess(pixels))
    return torch.stack(images)


def lesion_masks(cases: list[Case], size: int) -> torch.Tensor:
    """Soft targets on the model grid: exp(-2 (d / r)^2), 1 at the centre, 0.14 on the circle.

    Cell (i, j) of the area resize covers source pixels [i, i+1) * 1024 / size, so its centre
    is at (i + 0.5) * 1024 / size - 0.5 in source pixel coordinates.
    """
    step = MIAS_SIZE / size
    centres = (np.arange(size, dtype=np.float32) + 0.5) * step - 0.5
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    masks = np.zeros((len(cases), 1, size, size), np.float32)
    for index, case in enumerate(cases):
        for row, col, radius in case.lesions:
            radius = max(radius, 2 * step)
            distance2 = ((rows - row) ** 2 + (cols - col) ** 2) / radius**2
            masks[index, 0] = np.maximum(masks[index, 0], np.exp(-2.0 * distance2))
    return torch.from_numpy(masks)


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
    """Image indices per fold: women (pairs) dealt round-robin within three strata (a malignant
    lesion, a benign one only, normal), so every fold gets its share of each."""
    rng = np.random.default_rng(seed)
    by_pair: dict[int, list[Case]] = {}
    for case in cases:
        by_pair.setdefault(case.pair, []).append(case)

    def stratum(pair: int) -> int:
        members = by_pair[pair]
        return 2 if any(c.malignant for c in members) else int(any(c.abnormal for c in members))

    assignment: dict[int, int] = {}
    offset = 0
    for level in (2, 1, 0):
        group = [p for p in sorted(by_pair) if stratum(p) == level]
        for position, pair in enumerate(rng.permutation(group)):
            assignment[int(pair)] = (position + offset) % folds
        offset += len(group)
    pair_of = np.array([c.pair for c in cases])
    fold_of = np.array([assignment[int(p)] for p in pair_of])
    return [np.flatnonzero(fold_of == k) for k in range(folds)]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int  # one epoch = as many patches as there are training images
    batch_size: int
    patch: int
    lr: float
    seed: int


def sample_patches(images: torch.Tensor, masks: torch.Tensor, cases: list[Case],
                   train_idx: np.ndarray, config: TrainConfig,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of augmented patches, half from images with a lesion (centred near it), half
    from the rest (centred on breast tissue); random scale, vertical flip, gamma and contrast."""
    with_lesion = [i for i in train_idx if cases[i].lesions]
    without = [i for i in train_idx if not cases[i].abnormal]
    size = images.shape[-1]
    xs, ys = [], []
    for slot in range(config.batch_size):
        if slot % 2 == 0:
            index = int(rng.choice(with_lesion))
            row, col, _ = cases[index].lesions[int(rng.integers(len(cases[index].lesions)))]
            centre = np.array([row, col]) * size / MIAS_SIZE + rng.uniform(-0.4, 0.4, 2) * config.patch
        else:
            index = int(rng.choice(without))
            tissue = np.argwhere(images[index, 0].numpy() > 0.1)
            centre = tissue[rng.integers(len(tissue))].astype(float)
        extent = int(round(config.patch * rng.uniform(0.8, 1.25)))
        top = int(np.clip(centre[0] - extent / 2, 0, size - extent))
        left = int(np.clip(centre[1] - extent / 2, 0, size - extent))
        window = (slice(None), slice(top, top + extent), slice(left, left + extent))
        pair = torch.stack([images[index][window], masks[index][window]])
        pair = F.interpolate(pair, size=(config.patch, config.patch), mode="bilinear",
                             align_corners=False)
        if rng.random() < 0.5:
            pair = pair.flip(-2)
        x = pair[0].clamp(0, 1) ** float(rng.uniform(0.7, 1.4))
        x = ((x - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.05, 0.05)).clamp(0, 1)
        xs.append(x)
        ys.append(pair[1])
    return torch.stack(xs), torch.stack(ys)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel BCE with lesion pixels weighted up. No Dice term: with a weak signal, a batch Dice
    rewards raising the whole map and the network settles on a constant."""
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(POS_WEIGHT))


def train_model(config: TrainConfig, images: torch.Tensor, masks: torch.Tensor,
                cases: list[Case], train_idx: np.ndarray, log_prefix: str = "") -> Heatmapper:
    """A fixed schedule (AdamW, one-cycle LR) so no held-out image ever chooses the model."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    steps = -(-config.epochs * len(train_idx) // config.batch_size)
    model = build_net()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr,
                                                    total_steps=steps, pct_start=0.15)
    model.train()
    started, losses = time.time(), []
    for step in range(1, steps + 1):
        x, y = sample_patches(images, masks, cases, train_idx, config, rng)
        loss = segmentation_loss(model.net(contrast_channels(x)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps:
            print(f"{log_prefix}step {step:4d}/{steps} loss {np.mean(losses[-50:]):.4f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    return model.eval()


def predict(model: Heatmapper, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probabilities, heatmaps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            probability, heatmap = model(images[start:start + 16])
            probabilities.append(probability.numpy())
            heatmaps.append(heatmap[:, 0].numpy())
    return np.concatenate(probabilities), np.concatenate(heatmaps)


def hit_rate(cases: list[Case], heatmaps: np.ndarray) -> tuple[int, int]:
    """Images with a lesion centre whose heatmap peak falls inside one of their circles."""
    step = MIAS_SIZE / heatmaps.shape[-1]
    hits = total = 0
    for case, heatmap in zip(cases, heatmaps, strict=True):
        if not case.lesions:
            continue
        total += 1
        row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        peak_r, peak_c = (row + 0.5) * step - 0.5, (col + 0.5) * step - 0.5
        if any((peak_r - r) ** 2 + (peak_c - c) ** 2 <= max(rad, step) ** 2
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


def cross_validate(args: argparse.Namespace, config: TrainConfig, cases: list[Case],
                   images: torch.Tensor, masks: torch.Tensor) -> dict[str, Any]:
    """Out-of-fold scores and heatmaps for every image, each from a model that never saw its
    woman; returns the metrics and the operating points chosen on them."""
    labels = np.array([c.abnormal for c in cases], dtype=int)
    malignant = np.array([c.malignant for c in cases], dtype=int)
    groups = np.array([c.pair for c in cases])
    folds = grouped_folds(cases, args.folds, args.seed)
    scores = np.zeros(len(cases))
    heatmaps = np.zeros((len(cases), args.size, args.size), np.float32)
    fold_aucs = []
    for k, test_idx in enumerate(folds):
        train_idx = np.setdiff1d(np.arange(len(cases)), test_idx)
        assert not set(groups[test_idx]) & set(groups[train_idx]), "a woman in two folds"
        print(f"fold {k + 1}/{args.folds}: {len(train_idx)} training images, {len(test_idx)} "
              f"test images ({labels[test_idx].sum()} abnormal)", flush=True)
        model = train_model(config, images, masks, cases, train_idx, log_prefix=f"fold {k + 1} ")
        scores[test_idx], heatmaps[test_idx] = predict(model, images[test_idx])
        fold_aucs.append(auc(labels[test_idx], scores[test_idx]))
        print(f"fold {k + 1}: test AUC {fold_aucs[-1]:.3f}", flush=True)
    hits, with_centre = hit_rate(cases, heatmaps)
    normal_ci = bootstrap_auc_ci(labels, scores, groups, args.seed)
    malignant_ci = bootstrap_auc_ci(malignant, scores, groups, args.seed)
    return {
        "metrics": {
            "split": f"{args.folds}-fold cross-validation grouped by woman (left/right pair), "
                     "stratified (malignant / benign only / normal women); fixed training "
                     "schedule, no early stopping, nothing tuned on test folds; out-of-fold "
                     "predictions pooled",
            "normal_vs_abnormal_auc": round(auc(labels, scores), 4),
            "normal_vs_abnormal_auc_ci95": [round(v, 4) for v in normal_ci],
            "malignant_vs_rest_auc": round(auc(malignant, scores), 4),
            "malignant_vs_rest_auc_ci95": [round(v, 4) for v in malignant_ci],
            "fold_aucs": [round(a, 4) for a in fold_aucs],
            "lesion_hit_rate": round(hits / max(with_centre, 1), 4),
            "lesion_hits": [hits, with_centre],
            "ci_method": "bootstrap over women, 2000 rounds, percentile",
        },
        "operating_points": operating_points(labels, scores),
    }


def measure_inference_ms(out: Path, threads: int) -> float:
    """Load the bundle just written, as the worker does, and time one 1024 x 832 image."""
    runner = load_bundle(out, "cpu")
    torch.set_num_threads(threads)
    image = np.random.default_rng(0).integers(0, 4096, (1024, 832)).astype(np.float32)
    runner.predict([image])
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        runner.predict([image])
        timings.append(time.perf_counter() - started)
    return round(1000 * float(np.median(timings)), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mias")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / NAME)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=70,
                        help="patches per model = epochs x training images")
    parser.add_argument("--size", type=int, default=256, help="model input height and width")
    parser.add_argument("--patch", type=int, default=96, help="training patch side (cells)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.data / "Info.txt").is_file():
        print(f"mini-MIAS not found at {args.data} (Info.txt missing)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.time()
    config = TrainConfig(args.epochs, args.batch_size, args.patch, args.lr, args.seed)
    metadata = metadata_template(args.size)
    cases = parse_info(args.data / "Info.txt")
    images = load_images(args.data, cases, build_preprocess(metadata))
    masks = lesion_masks(cases, args.size)
    agree = sum(c.flipped == (int(c.ref[3:]) % 2 == 1) for c in cases)
    print(f"{len(cases)} images, {sum(c.abnormal for c in cases)} abnormal "
          f"({sum(c.malignant for c in cases)} malignant), {len({c.pair for c in cases})} women; "
          f"orientation from pixels agrees with Info.txt's left/right on {agree}/{len(cases)}",
          flush=True)

    evaluation = cross_validate(args, config, cases, images, masks)
    m = evaluation["metrics"]
    print(f"out-of-fold AUC {m['normal_vs_abnormal_auc']:.3f} (95% CI "
          f"{m['normal_vs_abnormal_auc_ci95'][0]:.3f}-{m['normal_vs_abnormal_auc_ci95'][1]:.3f});"
          f" malignant vs rest {m['malignant_vs_rest_auc']:.3f}; hit rate "
          f"{m['lesion_hits'][0]}/{m['lesion_hits'][1]}; final fit on all images", flush=True)

    final = train_model(config, images, masks, cases, np.arange(len(cases)), log_prefix="final ")
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "model.ts"
    with torch.inference_mode():
        traced = torch.jit.trace(final, torch.zeros(1, 1, args.size, args.size))
    traced.save(str(model_path))
    points = evaluation["operating_points"]
    command = "python -m tools.train_baseline " + " ".join(argv if argv is not None else sys.argv[1:])
    metadata.update({
        "operating_points": {name: p["threshold"] for name, p in points.items()},
        "operating_points_detail": points,
        "metrics": m,
        "training": {
            "data": "mini-MIAS (322 scanned-film MLO mammograms of 161 women, 1024 x 1024, "
                    "200 um, 8-bit; research licence)",
            "images": len(cases), "abnormal": sum(c.abnormal for c in cases),
            "malignant": sum(c.malignant for c in cases),
            "architecture": f"MONAI BasicUNet features {list(FEATURES)}, batch norm, fed the "
                            f"image and its local contrast (image minus {list(CONTRAST_SCALES)}-"
                            f"cell box blurs); score = peak of the {POOL}x{POOL}-smoothed heatmap",
            "supervision": f"soft lesion-circle targets exp(-2 (d/r)^2); pixel BCE "
                           f"(pos_weight {POS_WEIGHT:g}) on {args.patch}x{args.patch} patches",
            "schedule": f"{args.epochs} epochs (one epoch = as many {args.patch}x{args.patch} "
                        f"patches as training images), batches of {args.batch_size}, AdamW, "
                        f"one-cycle LR {args.lr:g}; same for every fold and the final model",
            "seed": args.seed, "command": command.strip(), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {args.threads} threads",
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "model_sha256": file_sha256(model_path),
    })
    metadata["training"]["wall_time_s"] = round(time.time() - started, 1)
    (args.out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    metadata["training"]["inference_ms_1024x832"] = measure_inference_ms(args.out, args.threads)
    (args.out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(metadata))
    print(f"bundle written to {args.out} in {metadata['training']['wall_time_s'] / 60:.1f} min",
          flush=True)
    return 0


def _verdict(low: float, high: float) -> str:
    """Say plainly when the measured AUC does not exclude chance."""
    if low <= 0.5 <= high:
        return ("**The 95 % CI includes 0.5: this model has not shown that it can tell abnormal "
                "from normal images.** It is a working, honestly measured baseline for the "
                "pipeline, not a useful detector.")
    return ("The CI excludes chance, but this is a weak detector on scanned film: a baseline for "
            "the pipeline, not a clinical tool.")


def model_card(metadata: dict[str, Any]) -> str:
    m, t, p = metadata["metrics"], metadata["training"], metadata["operating_points_detail"]
    lo, hi = m["normal_vs_abnormal_auc_ci95"]
    mlo, mhi = m["malignant_vs_rest_auc_ci95"]
    hits = f"{m['lesion_hits'][0]}/{m['lesion_hits'][1]}"
    height, width = metadata["input"]["height"], metadata["input"]["width"]
    rows = "".join(
        f"| {name} | {v['threshold']:.4f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} |\n"
        for name, v in p.items()
    )
    return f"""# Model card: {metadata['name']} {metadata['version']}

**Research use only, not for diagnosis.** Trained on a small public research database of
scanned film; it has never been validated on full-field digital mammography or on a screening
population.

## What it does
Input: one mammogram, oriented chest wall left (nipple right), bright = dense; the whole image
area-resized to {height} x {width} (no crop), intensities scaled by the 0.5–99.5 percentiles.
Outputs: {metadata['output']['score']}; and a heatmap of lesion likelihood (the SEG content),
mapped back to the source image's exact rows x columns. The node reports per view, per breast
(max of its views) and per exam (max of breasts).
TorchScript contract: `{metadata['output']['contract']}`.

## Data
mini-MIAS (Mammographic Image Analysis Society): {t['images']} scanned-film MLO mammograms of
161 women, 1024 x 1024, 200 µm pixels, 8-bit; {t['abnormal']} abnormal images ({t['malignant']}
malignant). Licence: research use only; no renting, leasing or selling. Citation: Suckling J. et
al., "The Mammographic Image Analysis Society Digital Mammogram Database", Excerpta Medica
International Congress Series 1069, 1994, pp. 375–378. No MIAS image is stored in this repository.

## How it was trained
{t['architecture']}. Supervision: {t['supervision']}; abnormal and normal images sampled
equally; augmentation: random scale (0.8–1.25), vertical flips, gamma and contrast. Schedule:
{t['schedule']}. Each film is mirrored to chest wall left from its pixels (the half with more
tissue over the middle rows), its annotation with it. Seed {t['seed']}.

## Measured performance (exactly as measured; never tuned on test folds)
Split: {m['split']}.

| metric | value | 95 % CI |
|---|---|---|
| normal vs abnormal AUC | {m['normal_vs_abnormal_auc']:.3f} | {lo:.3f}–{hi:.3f} |
| malignant vs rest AUC | {m['malignant_vs_rest_auc']:.3f} | {mlo:.3f}–{mhi:.3f} |
| lesion hit rate (heatmap peak inside a circle) | {m['lesion_hit_rate']:.3f} ({hits}) | |

Hit rate: over the abnormal images that have an annotated centre. Per-fold AUC:
{', '.join(f'{a:.3f}' for a in m['fold_aucs'])}. CIs: {m['ci_method']}.
{_verdict(lo, hi)}

Operating points (chosen on the out-of-fold predictions; the final model is trained on all
images, so its scores may sit slightly differently):

| name | threshold | sensitivity | specificity |
|---|---|---|---|
{rows}
The node reports "suspicious" at or above the **balanced** threshold.

## Limits
- Research model: small data (322 images), scanned film, MLO only; CC views and digital images
  go through the same preprocessing but were never seen in training.
- Wide confidence intervals: about 23 abnormal images per test fold.
- Calcifications are mostly invisible at this resolution; the heatmap is coarse ({height} x
  {width} grid, ≈ {200 * 1024 / height:.0f} µm per cell on MIAS) and resized to the source.
- The score is not a calibrated probability for a screening population (MIAS is 36 % abnormal).

## Retrain
`{t['command']}` (or `make train`) from the repository root with mini-MIAS at
`../shared/data/mias`. Wall time here {t['wall_time_s'] / 60:.1f} min (cross-validation and final
fit) on {t['machine']} (torch {t['torch']}). CPU inference: {t['inference_ms_1024x832']} ms for
one 1024 x 832 image including preprocessing and heatmap mapping ({t['machine']}).
"""


if __name__ == "__main__":
    raise SystemExit(main())

"""Does fine-tuning the trunk (its last stage, or all of it) beat the frozen trunk? An
outer-fold diagnostic.

    python -m tools.model.topfit --features build/cells/lite0 --out build/cells/topfit
    python -m tools.model.topfit --features build/cells/lite0 --out build/cells/e1 \
        --train all --mias ../shared/data/mias

The bundle's trunk is frozen (`tools/model/cells.py`): ImageNet features, a per-cell head on top.
This runs the first step past that on a CPU: within each outer training part of one repeat of the
nested CV's grouped split (`--repeat`; women never cross folds), the trunk's stride-32 stage (the
blocks after the stride-16 output, 2.26 M of the 2.96 M weights of Lite0's trunk) is trained with a
per-cell lesion head, from the cached stride-16 maps of `cells extract` (no mirrors), and then:

- **own head**: the jointly trained head's cell logits give the scores (mean of the 3 highest
  breast cells, minus half the other breast's, the shipped pooling) and the heatmap peak;
- **shipped recipe, refitted**: the stride-32 maps of every film are recomputed with the trained
  stage, and the shipped recipe's heads (`models/*/metadata.json`: score head level, L2,
  pooling, contralateral; heat head level, L2, loss) are fitted on the training part as
  `cells final` fits them.

Each is compared with the same head on the frozen trunk, fitted on the same films. `--train
norms` trains only the stage's batch-norm scales and shifts (about 1 % of its weights) beside
the head: the same question with far fewer weights to fit. `--train all` (with `--mias`) trains
the whole trunk, stem to last block, end to end from each film's canvas (rebuilt as `cells
extract` builds it, on the same content box), with augmentation (`augment`: a vertical mirror,
a gamma on the breast's intensities) and, beside the cell loss, an image loss on the pooled
cells (the whole-image stage of the patch-then-image recipe, on one network). The schedule
(`EPOCHS`, learning rates, weight decay) is fixed here before any run and not tuned: nothing is
chosen on a test fold, and nothing is chosen at all, so this is a diagnostic of one fixed recipe
(pooled over the outer folds of one repeat), not a nested estimate and not a model to ship.

The stage runs on each film's content box only (the box `cells extract` ran the trunk on), as
the worker does: on a zero-padded canvas its deeper blocks would see the stage's response to
zeros beyond the box, not the padding the cached maps were computed with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tools.model.cells import (
    SEED,
    CellModel,
    Features,
    LiteTrunk,
    cell_features,
    film_index,
    fit_cells,
    fit_head,
    image_scores,
    input_metadata,
    level_maps,
    peak_hits,
)
from tools.model.dataset import (
    grouped_folds,
    load_pixels,
    mias_records,
    to_model_orientation,
)
from tools.model.metrics import auc, bootstrap_auc_ci

EPOCHS = 6
TRUNK_LR = 1e-4
NORMS_LR = 1e-3  # `--train norms` (T2): fewer weights, a larger step; fixed before its run
HEAD_LR = 1e-3
WEIGHT_DECAY = 1e-2
HEAD_LEVEL = "16"  # the jointly trained head's cells: stride-16 map + upsampled stride-32 map
HEAD_L2 = 1e-2  # its starting point: the logistic head fitted on the frozen maps
# `--train all` (E1), fixed before its run: the whole trunk at half the stage's step (its early
# blocks hold the most general features), no decay on batch-norm scales and shifts or biases
ALL_LR = 5e-5
# `--init scratch` (the comparison with training from scratch, in the same folds): the
# trunk starts from random weights, so it gets the head's step, not a fine-tuning one, and its
# batch norms normalise each film with its own statistics while training (there are no
# ImageNet statistics to keep); everything else is E1's. Fixed before its run.
SCRATCH_LR = 1e-3
IMAGE_LOSS_WEIGHT = 1.0  # the image loss beside the (per-film normalised) cell loss
GAMMA_LOG_RANGE = 0.3  # intensity gamma exp(U(-0.3, 0.3)) on the breast's [0, 1] pixels
MIRROR_P = 0.5  # a vertical mirror of the content box (an MLO's mirror is another MLO)
TRUNK_FILE = "trunk.pt"  # `--final`: the trained trunk's state dict


def content_boxes(f32: np.ndarray) -> list[tuple[int, int]]:
    """Each film's content box in stride-16 cells (rows, columns), from where its cached
    stride-32 map is non-zero (`cells extract` writes zeros outside the box it ran on)."""
    boxes = []
    for maps in f32:
        inside = np.abs(maps.astype(np.float32)).sum(0) > 0
        rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
        boxes.append((2 * (int(rows.max()) + 1), 2 * (int(cols.max()) + 1)) if rows.size
                     else (2, 2))
    return boxes


class CellHead(nn.Module):
    """A fitted logistic cell head (`CellModel`) as a trainable 1x1 convolution `head` on the
    standardised `HEAD_LEVEL` cells of the trunk's two maps."""

    def __init__(self, head: CellModel) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(head.mean).float().view(1, -1, 1, 1))
        self.register_buffer("std", torch.from_numpy(head.std).float().view(1, -1, 1, 1))
        self.head = nn.Conv2d(head.mean.size, 1, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(head.w).float().view(1, -1, 1, 1))
            self.head.bias.fill_(head.b)

    def cell_logits(self, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        cells = cell_features(f16, f32, HEAD_LEVEL)
        return self.head((cells - self.mean) / self.std)[:, 0]


class CellLoss:
    """The class-balanced cell loss over a training part: lesion cells against every other
    usable breast cell (`films` keeps those that give it: not the ones with an abnormality but
    no circle, as `cells.training_cells`), scaled so that a film's loss is on the scale of a
    mean over the part's films."""

    def __init__(self, feats: Features, films: np.ndarray) -> None:
        mask, label, info = feats.mask["16"], feats.label["16"], feats.info
        self.films = [int(i) for i in films
                      if not (info[i]["label"] == 1 and not info[i]["has_lesions"])]
        pos = sum(int(((label[i] == 1) & mask[i]).sum()) for i in self.films)
        neg = sum(int(((label[i] == 0) & mask[i]).sum()) for i in self.films)
        self.pos_weight = torch.tensor(neg / max(pos, 1))
        self.scale = len(self.films) / (neg + float(self.pos_weight) * pos)

    def __call__(self, logits: torch.Tensor, mask: np.ndarray, label: np.ndarray
                 ) -> torch.Tensor | None:
        """One film's loss from its cell logits, breast mask and labels (None: no usable cell)."""
        keep = torch.from_numpy(mask & (label >= 0))
        if not keep.any():
            return None
        target = torch.from_numpy((label == 1).astype(np.float32))
        return F.binary_cross_entropy_with_logits(
            logits[keep], target[keep], pos_weight=self.pos_weight, reduction="sum") * self.scale


class TopStage(CellHead):
    """The trunk's stride-32 stage with a per-cell logistic head on `HEAD_LEVEL` cells; its batch
    norms keep their ImageNet statistics (eval mode), as the bundle's folded trunk does."""

    def __init__(self, trunk: LiteTrunk, head: CellModel) -> None:
        super().__init__(head)
        self.stage = trunk.blocks32
        self.stage.eval()

    def maps32(self, f16: torch.Tensor) -> torch.Tensor:
        return self.stage(f16)

    def forward(self, f16: torch.Tensor) -> torch.Tensor:
        return self.cell_logits(f16, self.stage(f16))


class WholeTrunk(CellHead):
    """The whole trunk (stem to last block) with the per-cell head on `HEAD_LEVEL` cells, from a
    (1, H, W) canvas crop; batch norms keep their ImageNet statistics (eval mode)."""

    def __init__(self, trunk: LiteTrunk, head: CellModel) -> None:
        super().__init__(head)
        self.trunk = trunk
        self.trunk.eval()

    def maps(self, crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trunk(crop[None])

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        return self.cell_logits(*self.maps(crop))


def film_crops(mias: Path, info: list[dict[str, Any]], boxes: list[tuple[int, int]],
               pectoral_detector: int = 1) -> list[torch.Tensor]:
    """Each film's canvas on its content box, (1, H, W), built as `cells extract` builds it
    (same orientation, canvas, box and pectoral detector); SystemExit when a box differs from
    the cache's."""
    from pipelines.model import content_box
    from pipelines.preprocess import canvas_input

    records = {record.id: record for record in mias_records(mias)}
    metadata = {"input": input_metadata(pectoral_detector=pectoral_detector)}
    crops = []
    for item, box in zip(info, boxes, strict=True):
        record = records[item["id"]]
        canvas, placement, _ = canvas_input(to_model_orientation(load_pixels(record), record),
                                            metadata, record.view, record.pixel_spacing_mm)
        h, w = content_box(metadata, placement)
        if (h // 16, w // 16) != tuple(box):
            raise SystemExit(f"{record.id}: content box {h}x{w} px is not the cache's "
                             f"{box} cells; extract again from the same --mias")
        crops.append(canvas[:, :h, :w].clone())
    return crops


def augment(crop: torch.Tensor, mask: np.ndarray, label: np.ndarray, rng: np.random.Generator
            ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A training copy of a film: mirrored top to bottom within its content box (with its
    stride-16 mask and labels; the box is a multiple of 32 pixels, so the cells mirror exactly)
    with probability `MIRROR_P`, and its breast intensities raised to a gamma exp(U(-r, r))
    (off-breast zeros stay zero)."""
    if rng.random() < MIRROR_P:
        crop = torch.flip(crop, dims=[1])
        mask, label = mask[::-1].copy(), label[::-1].copy()
    gamma = float(np.exp(rng.uniform(-GAMMA_LOG_RANGE, GAMMA_LOG_RANGE)))
    return crop.clamp(0.0, 1.0) ** gamma, mask, label


def batch_norms_learn(trunk: nn.Module) -> None:
    """Every batch norm of `trunk` in training mode (batch statistics, running ones updated),
    the rest (drop connect) left in evaluation mode."""
    for module in trunk.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()


def scratch_trunk(arch: str, seed: int, crops: list[torch.Tensor], feats: Features,
                  train: np.ndarray) -> WholeTrunk:
    """`--init scratch`: a randomly initialised trunk (seeded) with its per-cell head started
    as E1's is, from the logistic head on the training films' maps, here the random trunk's
    (batch norms on each film's own statistics, as it will train)."""
    torch.manual_seed(seed)
    trunk = LiteTrunk(arch, pretrained=False)
    probe = WholeTrunk(trunk, _placeholder_head(feats))
    batch_norms_learn(probe.trunk)
    with torch.no_grad():
        f16, f32 = trunk_maps(probe, crops, feats, np.float32)
    random = Features({"16": f16, "32": f32}, feats.mask, feats.label, feats.info)
    maps, mask, label = level_maps(random, HEAD_LEVEL)
    return WholeTrunk(trunk, fit_cells(maps, mask, label, train, feats.info, HEAD_L2, seed))


def _placeholder_head(feats: Features) -> CellModel:
    channels = feats.level["16"].shape[1] + feats.level["32"].shape[1]
    return CellModel(np.zeros(channels, np.float32), np.ones(channels, np.float32),
                     np.zeros(channels, np.float32), 0.0)


def train_all(model: WholeTrunk, crops: list[torch.Tensor], feats: Features,
              films: np.ndarray, seed: int, epochs: int = EPOCHS, trunk_lr: float = ALL_LR,
              learn_norms: bool = False) -> list[float]:
    """E1: the whole trunk and the head, one augmented film per step: the class-balanced cell
    loss of `train_stage` (films with an abnormality but no circle give none) plus
    `IMAGE_LOSS_WEIGHT` x a class-balanced logistic loss of the image logit (mean of the 3
    highest breast cells, the shipped pooling) against the film's label; AdamW (`ALL_LR` on the
    trunk, `HEAD_LR` on the head); the mean loss of each epoch."""
    mask16, label16, info = feats.mask["16"], feats.label["16"], feats.info
    cell_loss = CellLoss(feats, films)
    cell_usable = set(cell_loss.films)
    abnormal = sum(int(info[i]["label"]) for i in films)
    image_weight = torch.tensor((len(films) - abnormal) / max(abnormal, 1))
    decay, no_decay = [], []
    for parameter in model.trunk.parameters():
        parameter.requires_grad_(True)
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    optimiser = torch.optim.AdamW([
        {"params": decay, "lr": trunk_lr, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "lr": trunk_lr, "weight_decay": 0.0},
        {"params": model.head.parameters(), "lr": HEAD_LR, "weight_decay": WEIGHT_DECAY}])
    rng = np.random.default_rng(seed)
    losses = []
    if learn_norms:
        batch_norms_learn(model.trunk)
    for epoch in range(epochs):
        total, started = 0.0, time.time()
        for i in rng.permutation(films):
            h, w = crops[i].shape[1] // 16, crops[i].shape[2] // 16
            crop, mask, label = augment(crops[i], mask16[i][:h, :w], label16[i][:h, :w], rng)
            logits = model(crop)[0]
            inside = torch.from_numpy(mask)
            if not inside.any():
                continue
            top = torch.topk(logits[inside], min(3, int(inside.sum()))).values.mean()
            target = torch.tensor(float(info[i]["label"]))
            loss = IMAGE_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(
                top, target, pos_weight=image_weight)
            cells = cell_loss(logits, mask, label) if int(i) in cell_usable else None
            if cells is not None:
                loss = loss + cells
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        losses.append(total / max(1, len(films)))
        print(f"  epoch {epoch}: loss {losses[-1]:.4f} ({time.time() - started:.0f}s)",
              file=sys.stderr, flush=True)
    return losses


def recomputed_all(model: WholeTrunk, crops: list[torch.Tensor], feats: Features
                   ) -> tuple[Features, np.ndarray]:
    """`recomputed` for E1: both levels' maps from the trained trunk, and the own head's cells."""
    logits = np.zeros((len(feats.info), *feats.level["16"].shape[2:]), np.float32)

    def own_cells(i: int, g16: torch.Tensor, g32: torch.Tensor) -> None:
        h, w = g16.shape[2:]
        logits[i, :h, :w] = model.cell_logits(g16, g32)[0].numpy()

    model.eval()
    with torch.inference_mode():
        f16, f32 = trunk_maps(model, crops, feats, np.float16, own_cells)
    return Features({"16": f16, "32": f32}, feats.mask, feats.label, feats.info), logits


def trunk_maps(model: WholeTrunk, crops: list[torch.Tensor], feats: Features, dtype: Any,
               each: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Both levels' maps of every film's crop through `model`'s trunk, on the cache's grid
    (zeros off the content box); `each(i, g16, g32)` sees every film's maps as they come."""
    f16 = np.zeros_like(feats.level["16"], dtype=dtype)
    f32 = np.zeros_like(feats.level["32"], dtype=dtype)
    for i, crop in enumerate(crops):
        h, w = crop.shape[1] // 16, crop.shape[2] // 16
        g16, g32 = model.maps(crop)
        f16[i, :, :h, :w] = g16[0].numpy()
        f32[i, :, :h // 2, :w // 2] = g32[0].numpy()
        if each is not None:
            each(i, g16, g32)
    return f16, f32


def _box(feats: Features, i: int, box: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(feats.level["16"][i, :, :box[0], :box[1]].astype(np.float32))[None]


def stage_parameters(model: TopStage, train: str) -> tuple[list[nn.Parameter], float, float]:
    """The stage's weights that `train` trains ("stage": all; "norms": the batch norms' scales
    and shifts only, 1 % of them), with their learning rate and weight decay (none on scales:
    decay would pull them to 0); the rest are frozen."""
    if train == "stage":
        chosen = list(model.stage.parameters())
        lr, decay = TRUNK_LR, WEIGHT_DECAY
    elif train == "norms":
        chosen = [p for m in model.stage.modules() if isinstance(m, nn.BatchNorm2d)
                  for p in m.parameters()]
        lr, decay = NORMS_LR, 0.0
    else:
        raise ValueError(f"train: {train!r} is neither 'stage' nor 'norms'")
    keep = {id(p) for p in chosen}
    for parameter in model.stage.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return chosen, lr, decay


def train_stage(model: TopStage, feats: Features, boxes: list[tuple[int, int]],
                films: np.ndarray, seed: int, epochs: int = EPOCHS, train: str = "stage"
                ) -> list[float]:
    """Class-balanced cell loss (lesion cells vs every other usable breast cell, films with an
    abnormality but no circle left out, as `cells.training_cells`), one film per step, AdamW on
    the head and the stage's weights that `train` names (`stage_parameters`); the mean loss of
    each epoch."""
    mask, label = feats.mask["16"], feats.label["16"]
    cell_loss = CellLoss(feats, films)
    usable = cell_loss.films
    chosen, lr, decay = stage_parameters(model, train)
    optimiser = torch.optim.AdamW([
        {"params": chosen, "lr": lr, "weight_decay": decay},
        {"params": model.head.parameters(), "lr": HEAD_LR, "weight_decay": WEIGHT_DECAY}])
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for i in rng.permutation(usable):
            h, w = boxes[i]
            loss = cell_loss(model(_box(feats, i, boxes[i]))[0], mask[i][:h, :w],
                             label[i][:h, :w])
            if loss is None:
                continue
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        losses.append(total / max(1, len(usable)))
    return losses


def recomputed(model: TopStage, feats: Features, boxes: list[tuple[int, int]]
               ) -> tuple[Features, np.ndarray]:
    """The films' features with the trained stage's stride-32 maps, and the own head's stride-16
    cell logits (zeros outside the box, where the mask excludes every cell anyway)."""
    f32 = np.zeros_like(feats.level["32"], dtype=np.float16)
    grid = feats.level["16"].shape[2:]
    logits = np.zeros((len(feats.info), *grid), np.float32)
    with torch.inference_mode():
        for i, (h, w) in enumerate(boxes):
            f16 = _box(feats, i, (h, w))
            f32[i, :, :h // 2, :w // 2] = model.maps32(f16)[0].numpy()
            logits[i, :h, :w] = model(f16)[0].numpy()
    return Features({"16": feats.level["16"], "32": f32}, feats.mask, feats.label,
                    feats.info), logits


def shipped_recipe(metadata: dict[str, Any]) -> dict[str, Any]:
    config = metadata["training"]["arch_config"]
    heat = config["heat_head"]
    return {"level": config["level"], "l2": config["l2"], "pooling": config["pooling"],
            "contra": config["contralateral"],
            "heat": {k: heat[k] for k in ("level", "l2", "mode", "loss")}}


def recipe_of(chosen: list[Any]) -> dict[str, Any]:
    """A nested run's choice for one outer fold (`metrics.recipes_chosen`: [features:level, L2,
    pooling, contralateral, [features:level, L2, mode, loss] of the heat head]) as a recipe."""
    key, l2, pooling, contra, heat = chosen
    return {"level": key.split(":")[1], "l2": l2, "pooling": pooling, "contra": contra,
            "heat": {"level": heat[0].split(":")[1], "l2": heat[1], "mode": heat[2],
                     "loss": heat[3]}}


def fold_recipes(metadata: dict[str, Any], repeat: int, folds: int, features: str
                 ) -> list[dict[str, Any]]:
    """The recipe each outer fold's inner CV chose in the bundle's nested run (`--recipes
    inner`): the nested run and this one split with the same seed (SEED + repeat) and the same
    grouped folds, so fold k here is its fold k; refused when the counts or the feature set
    differ. A bundle on a fine-tuned trunk (`tools/model/tuned.py`) keeps the recipes its outer
    runs fitted, as recipes; those of a run that took the inner choices are the same."""
    metrics = metadata["metrics"]
    chosen = metrics["recipes_chosen"]
    if repeat >= len(chosen) or len(chosen[repeat]) != folds:
        raise SystemExit(f"the bundle's nested run has no repeat {repeat} with {folds} folds")
    name = Path(features).name
    if all(isinstance(fold, dict) for fold in chosen[repeat]):
        kinds = metrics.get("recipes_kind") or []
        if repeat >= len(kinds) or kinds[repeat] != "inner":
            raise SystemExit(f"the bundle's repeat {repeat} did not fit the inner folds' recipes")
        if metrics.get("recipes_features") != name:
            raise SystemExit(f"the bundle's recipes are not on the features {name!r}")
        return [dict(fold) for fold in chosen[repeat]]
    if not all(isinstance(fold, list) and len(fold) == 5 for fold in chosen[repeat]):
        raise SystemExit("the bundle's recipes_chosen are neither a nested run's nor recipes")
    for fold in chosen[repeat]:
        if fold[0].split(":")[0] != name or fold[4][0].split(":")[0] != name:
            raise SystemExit(f"fold recipe {fold} is not on the features {name!r}")
    return [recipe_of(fold) for fold in chosen[repeat]]


@dataclass
class FoldResult:
    """One arm on one outer test fold: image scores, lesion hits, and per film (test order) the
    heatmap peak's lesion hit (None: no circle) and its (x, y) on the canvas."""

    scores: np.ndarray
    hits: tuple[int, int]
    per: list[bool | None]
    peaks: list[tuple[float, float]]


def evaluate_fold(feats: Features, train: np.ndarray, test: np.ndarray, recipe: dict[str, Any],
                  seed: int, own_logits: np.ndarray | None = None) -> dict[str, FoldResult]:
    """Test-film scores and lesion hits of the recipe's heads fitted on `train` ("shipped"),
    and of `own_logits` (a jointly trained head's cells) when given ("own"); `feats` has no
    mirrors, so rows are films."""
    info_test = [feats.info[i] for i in test]
    out = {}
    maps, mask, label = level_maps(feats, recipe["level"])
    score_head = fit_cells(maps, mask, label, train, feats.info, recipe["l2"], seed)
    scores = image_scores(score_head.logits(maps[test]), mask[test], info_test,
                          recipe["pooling"], recipe["contra"], tta=False)
    heat = recipe["heat"]
    hmaps, hmask, hlabel = level_maps(feats, heat["level"])
    heat_head = fit_head(hmaps, hmask, hlabel, train, feats.info, heat["l2"], heat["loss"], seed)
    peaks: list[tuple[float, float]] = []
    hit, total, per = peak_hits(heat_head.logits(hmaps[test]), hmask[test], info_test,
                                int(heat["level"].rstrip("c")), peaks, peak=heat["mode"])
    out["shipped"] = FoldResult(scores, (hit, total), per, peaks)
    if own_logits is not None:
        mask16 = feats.mask["16"][test]
        own = image_scores(own_logits[test], mask16, info_test, "top3", "diff", tta=False)
        peaks = []
        hit, total, per = peak_hits(own_logits[test], mask16, info_test, 16, peaks, peak="raw")
        out["own"] = FoldResult(own, (hit, total), per, peaks)
    return out


def schedule_of(train: str, epochs: int, init: str = "imagenet") -> dict[str, Any]:
    """The training schedule a run used (constants of this module, fixed before any run)."""
    scratch = init == "scratch"
    return {"train": train, "epochs": epochs,
            **({"init": "scratch", "batch_norms": "each film's statistics while training"}
               if scratch else {}),
            "trunk_lr": SCRATCH_LR if scratch else {
                "stage": TRUNK_LR, "norms": NORMS_LR, "all": ALL_LR}[train],
            "head_lr": HEAD_LR, "weight_decay": WEIGHT_DECAY, "head_level": HEAD_LEVEL,
            "head_start_l2": HEAD_L2,
            **({"image_loss_weight": IMAGE_LOSS_WEIGHT, "mirror_p": MIRROR_P,
                "gamma_log_range": GAMMA_LOG_RANGE} if train == "all" else {})}


def final_trunk(args: argparse.Namespace, feats: Features, meta: dict[str, Any],
                crops: list[torch.Tensor]) -> int:
    """E1's schedule on every film (the head started from the logistic head on all films' frozen
    maps; seed SEED + 1000, the seed of `cells final`'s selection): the trunk a bundle runs,
    saved as a `LiteTrunk` state dict with a record of how it was trained."""
    from node.bundle import file_sha256

    started = time.time()
    seed = SEED + 1000
    films = np.arange(len(feats.info))
    maps, mask, label = level_maps(feats, HEAD_LEVEL)
    start_head = fit_cells(maps, mask, label, films, feats.info, HEAD_L2, seed)
    whole = WholeTrunk(LiteTrunk(meta["arch"]), start_head)
    losses = train_all(whole, crops, feats, films, seed, args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(whole.trunk.state_dict(), out / TRUNK_FILE)
    record = {"features": args.features, "arch": meta["arch"], "seed": seed,
              "schedule": schedule_of(args.train, args.epochs),
              "train_loss": [round(v, 4) for v in losses],
              "ids": [item["id"] for item in feats.info],
              "sha256": file_sha256(out / TRUNK_FILE),
              "wall_s": round(time.time() - started, 1)}
    (out / "trunk.json").write_text(json.dumps(record, indent=1))
    print(f"trunk written to {out / TRUNK_FILE} ({record['wall_s']:.0f}s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, help="a `cells extract` folder (no mirrors)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--bundle", default="models/mias-baseline")
    parser.add_argument("--repeat", type=int, default=0, help="which repeat's outer split")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--train", default="stage", choices=("stage", "norms", "all"),
                        help="the whole stride-32 stage (T1), its batch norms only (T2), or "
                             "the whole trunk end to end from the films (E1, needs --mias)")
    parser.add_argument("--mias", type=Path, help="mini-MIAS folder (for --train all)")
    parser.add_argument("--init", default="imagenet", choices=("imagenet", "scratch"),
                        help="--train all's trunk: the ImageNet weights (E1) or random ones "
                             "(`SCRATCH_LR`, batch norms on each film's statistics); the "
                             "frozen arms keep the ImageNet trunk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default="shipped", choices=("shipped", "inner"),
                        help="the heads each outer fold fits on the trunk's maps: the bundle's "
                             "shipped recipe, or the one that fold's inner CV chose in the "
                             "bundle's nested run (on the frozen features)")
    parser.add_argument("--final", action="store_true",
                        help="with --train all: train on every film and write the trunk "
                             f"({TRUNK_FILE}, for `cells extract --trunk`); no folds")
    args = parser.parse_args(argv)
    if args.train == "all" and args.mias is None:
        raise SystemExit("--train all needs --mias (the films the cache was extracted from)")
    if args.init == "scratch" and (args.train != "all" or args.final):
        raise SystemExit("--init scratch is a comparison on the outer folds of --train all, "
                         "not a trunk for a bundle (no --final)")
    if args.final and args.train != "all":
        raise SystemExit("--final trains the whole trunk: it needs --train all")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    feats = Features.load(Path(args.features))
    meta = json.loads((Path(args.features) / "info.json").read_text())
    if meta.get("vflip"):
        raise SystemExit(f"{args.features}: extracted with mirrors; this diagnostic takes none")
    metadata = json.loads((Path(args.bundle) / "metadata.json").read_text())
    recipe = shipped_recipe(metadata)
    recipes = (fold_recipes(metadata, args.repeat, args.folds, args.features)
               if args.recipes == "inner" else [recipe] * args.folds)
    records, _ = film_index(feats.info)
    labels = np.array([r.label for r in records])
    groups = np.array([r.group for r in records])
    boxes = content_boxes(feats.level["32"])
    crops: list[torch.Tensor] = []
    if args.train == "all":
        crops = film_crops(args.mias, feats.info, boxes, int(meta.get("pectoral_detector", 1)))
    if args.final:
        return final_trunk(args, feats, meta, crops)
    seed = SEED + args.repeat
    arms = ("frozen shipped", "tuned shipped", "frozen own", "tuned own")
    scores = {arm: np.full(len(records), np.nan) for arm in arms}
    hits = {arm: [0, 0] for arm in arms}
    film_hit: dict[str, list[Any]] = {arm: [None] * len(records) for arm in arms}
    film_peak: dict[str, list[Any]] = {arm: [None] * len(records) for arm in arms}
    folds_out = []
    started = time.time()
    for fold, test in enumerate(grouped_folds(records, args.folds, seed)):
        test = np.array(sorted(test))
        train = np.setdiff1d(np.arange(len(records)), test)
        maps, mask, label = level_maps(feats, HEAD_LEVEL)
        start_head = fit_cells(maps, mask, label, train, feats.info, HEAD_L2, seed)
        frozen_model = TopStage(LiteTrunk(meta["arch"]), start_head)
        _, frozen_logits = recomputed(frozen_model, feats, boxes)
        if args.train == "all":
            scratch = args.init == "scratch"
            whole = (scratch_trunk(meta["arch"], seed + fold, crops, feats, train) if scratch
                     else WholeTrunk(LiteTrunk(meta["arch"]), start_head))
            losses = train_all(whole, crops, feats, train, seed + fold, args.epochs,
                               SCRATCH_LR if scratch else ALL_LR, learn_norms=scratch)
            tuned, tuned_logits = recomputed_all(whole, crops, feats)
        else:
            model = TopStage(LiteTrunk(meta["arch"]), start_head)
            losses = train_stage(model, feats, boxes, train, seed + fold, args.epochs,
                                 args.train)
            tuned, tuned_logits = recomputed(model, feats, boxes)
        results = {f"frozen {k}": v for k, v in evaluate_fold(
            feats, train, test, recipes[fold], seed, frozen_logits).items()}
        results |= {f"tuned {k}": v for k, v in evaluate_fold(
            tuned, train, test, recipes[fold], seed, tuned_logits).items()}
        fold_row: dict[str, Any] = {"fold": fold, "recipe": recipes[fold],
                                    "train_loss": [round(v, 4) for v in losses]}
        for arm, result in results.items():
            scores[arm][test] = result.scores
            hits[arm][0] += result.hits[0]
            hits[arm][1] += result.hits[1]
            for k, film in enumerate(test):
                film_hit[arm][film] = result.per[k]
                film_peak[arm][film] = [round(v, 2) for v in result.peaks[k]]
            fold_row[arm] = {"auc": round(auc(labels[test], result.scores), 4),
                             "hits": list(result.hits)}
        folds_out.append(fold_row)
        print(f"fold {fold}: " + ", ".join(f"{a} AUC {fold_row[a]['auc']} hits {fold_row[a]['hits']}"
                                           for a in arms)
              + f" ({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    malignant = np.array([r.malignant or 0 for r in records])
    summary = {}
    for arm in arms:
        low, high = bootstrap_auc_ci(labels, scores[arm], groups, n=2000, seed=seed)
        mlow, mhigh = bootstrap_auc_ci(malignant, scores[arm], groups, n=2000, seed=seed)
        summary[arm] = {"auc": round(auc(labels, scores[arm]), 4),
                        "auc_ci95": [round(low, 4), round(high, 4)], "hits": hits[arm],
                        "malignant_auc": round(auc(malignant, scores[arm]), 4),
                        "malignant_auc_ci95": [round(mlow, 4), round(mhigh, 4)]}
        print(f"{arm}: AUC {summary[arm]['auc']} {summary[arm]['auc_ci95']} hits {hits[arm]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "topfit.json").write_text(json.dumps({
        "features": args.features, "repeat": args.repeat, "seed": seed, "folds": args.folds,
        "schedule": schedule_of(args.train, args.epochs, args.init),
        "recipe": recipe, "recipes": args.recipes, "summary": summary, "per_fold": folds_out,
        # each arm's outer-fold image score of every film (the pooled cell logits, before any
        # calibration), in `ids` order: what a bundle built this way would be calibrated on
        "ids": [r.id for r in records],
        "oof": {arm: [round(float(v), 5) for v in scores[arm]] for arm in arms},
        # each arm's heatmap peak per film on its outer fold: hit (None: no circle) and (x, y)
        # on the canvas, whose placement in the stored film is `placement`
        "hit": film_hit, "peak_canvas_xy": film_peak,
        "placement": [item["placement"] for item in feats.info],
        "wall_s": round(time.time() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

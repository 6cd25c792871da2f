"""Frozen ImageNet EfficientNet-Lite trunk + per-cell linear head, chosen by nested CV on CPU.

Three steps, each a sub-command:

    python -m tools.model.cells extract --mias ../shared/data/mias --out build/cells/lite0
    python -m tools.model.cells nested --features build/cells/lite0 --out build/cells/nested
    python -m tools.model.cells final --features build/cells/lite0 \
        --nested build/cells/nested/nested.json --out models/mias-baseline

`extract` feeds every film, through the shared physical canvas (`pipelines/preprocess.py:
canvas_input`: chest wall left, breast crop, 0.4 mm pixels, breast-only windowing, 768 x 512
canvas), to the frozen trunk once (and its vertical mirror, the one augmentation that keeps the
chest wall on the left) and caches the feature maps at stride 16 and 32 with per-cell labels from
the lesion circles (inside = lesion, a ring around it ignored, every other breast cell of every
film background, cells outside the breast ignored; films with an abnormality but no circle
contribute no cell). `nested` runs repeated grouped cross-validation (by woman): within each outer
training part, an inner grouped CV picks the recipe (feature level, L2 strength, score pooling,
contralateral use) by inner out-of-fold AUC; the outer test fold is scored once with the recipe
picked. `final` picks the shipped recipe by grouped CV over all films, scores it out of fold
(calibration, operating points), fits it on all films and writes the bundle. `report` prints a
nested run's tables; `compare --base A/nested.json --other B/nested.json` sets two nested runs
on the same films side by side, with the paired AUC difference over women.
"""

from __future__ import annotations

import argparse
import itertools
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

from tools.model.dataset import (
    Record,
    grouped_folds,
    lesions_in_model_orientation,
    load_pixels,
    mias_records,
    to_model_orientation,
)
from tools.model.metrics import auc, bootstrap_auc_ci, bootstrap_auc_difference

CANVAS = (768, 512)
SPACING_MM = 0.4
RING_MM = 10.0  # cells within a lesion's radius + this are neither lesion nor background
BLOCK16 = {"efficientnet-lite0": 10, "efficientnet-lite2": 14}  # last block at stride 16
SEED = 20261130
CONTRA_WEIGHT = 0.5  # "diff": this breast's logit minus this times the other breast's
CONTRALATERAL_KEY = "contralateral"  # in metadata.json (pipelines/model.py applies it)
CONTEXT_PX = 64  # canvas padding the trunk sees beyond the breast crop
MIN_BOX_PX = 128  # smallest box side: top-10 pooling needs 10 cells at stride 32


def input_metadata(canvas: tuple[int, int] = CANVAS, spacing: float = SPACING_MM,
                   pectoral_detector: int = 1, cell_mask_detector: int | None = None
                   ) -> dict[str, Any]:
    """The `input` part of the bundle's metadata: what `canvas_input` reads (the key
    `pectoral_detector` only for detector 2: bundles without it run detector 1;
    `cell_mask_detector` only when it differs from `pectoral_detector`)."""
    detector = {} if pectoral_detector == 1 else {"pectoral_detector": pectoral_detector}
    if cell_mask_detector not in (None, pectoral_detector):
        detector["cell_mask_detector"] = cell_mask_detector
    return {
        "height": canvas[0], "width": canvas[1], "channels": 1,
        "orientation": "chest_wall_left", "photometric": "MONOCHROME2 (bright = dense)",
        "pixel_spacing_mm": spacing, "assumed_pixel_spacing_mm": 0.2, "crop_margin_mm": 2.0,
        "crop": "breast bounding box (pipelines/breast.py mask, pectoral removed on MLO), "
                "placed top-left on the canvas, chest wall on the left edge",
        "breast_mask": True,
        **detector,
        # the worker runs the network on the breasts' box (pipelines/model.py:content_box), the
        # box the features were cached on here
        "content_box": {"multiple": 32, "context_px": CONTEXT_PX, "min_px": MIN_BOX_PX},
        "intensity": {
            "lower_percentile": 0.5, "upper_percentile": 99.5, "within": "breast",
            "description": "breast-mask crop resampled to pixel_spacing_mm (bilinear, "
                           "antialiased), percentiles 0.5-99.5 of the breast pixels scaled to "
                           "[0, 1], clipped, 0 outside the breast and on the padding",
        },
    }


class LiteTrunk(nn.Module):
    """EfficientNet-Lite's stem and blocks, frozen: (stride-16 map, stride-32 map) of a
    grayscale canvas in [0, 1] (scaled to [-1, 1] and repeated to 3 channels, the Lite
    models' ImageNet preprocessing). `weights`: a fine-tuned trunk's state dict (`topfit
    --final` writes one) in place of the ImageNet weights."""

    def __init__(self, arch: str, weights: Path | None = None, pretrained: bool = True
                 ) -> None:
        super().__init__()
        from tools.model.nets import lite_network

        net = lite_network(arch, pretrained, 512)  # pretrained=False: random weights
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)  # type: ignore[arg-type]
        blocks = list(net._blocks)  # type: ignore[arg-type]
        split = BLOCK16[arch] + 1
        self.blocks16 = nn.Sequential(*blocks[:split])
        self.blocks32 = nn.Sequential(*blocks[split:])
        if weights is not None:
            self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        # drop_connect is training-only; eval() makes each block deterministic.
        self.eval()

    def for_inference(self) -> LiteTrunk:
        """The same function, faster on CPU: every batch norm folded into the convolution before
        it (its running statistics are frozen) and the weights in channels-last order (with the
        folding, 1.8 x faster at 4 x 768 x 512 on 2 cores; outputs within 2e-4)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        pairs = [(self.stem, "0", "1")]
        for block in [*self.blocks16, *self.blocks32]:
            pairs += [(block, conv, bn) for conv, bn in (
                ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
                if hasattr(block, conv) and hasattr(block, bn)]
        for owner, conv, bn in pairs:
            fused = fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn))
            setattr(owner, conv, fused)
            setattr(owner, bn, nn.Identity())
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = (x * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        f16 = self.blocks16(self.stem(rgb))
        return f16, self.blocks32(f16)


def _lite_block_forward_check(arch: str) -> None:
    """The Lite library's blocks take drop_connect_rate as an argument; in eval mode it is unused."""
    del arch


def cells_detector(meta: dict[str, Any]) -> int:
    """The pectoral detector whose mask gave a feature folder (or a bundle's `input`) its
    breast cells: `cell_mask_detector`, else its canvas's `pectoral_detector`."""
    return int(meta.get("cell_mask_detector") or meta.get("pectoral_detector", 1))


def cell_labels(lesions: list[tuple[float, float, float]], stride: int, grid: tuple[int, int],
                ring_px: float) -> np.ndarray:
    """Per-cell label on a stride grid (canvas coordinates): 1 inside a circle, -1 in the ring,
    0 elsewhere."""
    rows, cols = grid
    cy = (np.arange(rows) + 0.5) * stride - 0.5
    cx = (np.arange(cols) + 0.5) * stride - 0.5
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    label = np.zeros(grid, np.int8)
    for x, y, r in lesions:
        d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2)
        label[(d <= r + ring_px) & (label == 0)] = -1
    for x, y, r in lesions:
        d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2)
        label[d <= max(r, stride * 0.75)] = 1
    return label


def cell_mask(canvas: torch.Tensor, stride: int) -> np.ndarray:
    """Breast cells: at least half of the cell's canvas pixels are breast (non-zero)."""
    inside = (canvas > 0).float()[None]
    return (F.avg_pool2d(inside, stride)[0, 0] >= 0.5).numpy()


def extract(args: argparse.Namespace) -> int:
    from node.bundle import file_sha256
    from pipelines.model import content_box
    from pipelines.preprocess import canvas_input

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = mias_records(args.mias)
    mask_detector = args.cell_mask_detector or args.pectoral_detector
    metadata = {"input": input_metadata(pectoral_detector=args.pectoral_detector,
                                        cell_mask_detector=mask_detector)}
    # the trunk the bundle runs (batch norms folded, channels-last): the cached features are
    # the shipped network's, and extraction is 1.8 x faster
    trunk = LiteTrunk(args.arch, args.trunk).for_inference()
    started = time.time()
    f16s, f32s, m16s, m32s, l16s, l32s, info = [], [], [], [], [], [], []
    for index, record in enumerate(records):
        pixels = load_pixels(record)
        oriented = to_model_orientation(pixels, record)
        # --no-pectoral (an ablation): the mask as on a CC view, no pectoral search
        # with --cell-mask-detector the pixels that detector leaves out come negated: the
        # trunk sees |canvas|, the breast cells are where canvas > 0, as in the bundle
        canvas, placement, _ = canvas_input(oriented, metadata,
                                            record.view if args.pectoral else "CC",
                                            record.pixel_spacing_mm)
        lesions = []
        for le in lesions_in_model_orientation(record, pixels.shape):
            x, y = placement.point_to_canvas(le.x, le.y)
            lesions.append((x, y, le.r * placement.scale))
        ring = RING_MM / SPACING_MM
        views = [canvas]
        if args.vflip:
            views.append(torch.flip(canvas, dims=[1]))
        # The trunk sees the content region plus a margin of canvas padding (rounded to 32
        # pixels), not the whole canvas, as the worker runs it (`content_box`); the cached maps
        # are then placed on the full canvas grid (padding cells are masked).
        box_h, box_w = content_box(metadata, placement)
        with torch.inference_mode():
            g16, g32 = trunk(canvas[None, :, :box_h, :box_w].abs())
            if args.vflip:  # the mirror's content sits at the bottom of the canvas
                g16f, g32f = trunk(torch.flip(canvas, dims=[1])[None, :, CANVAS[0] - box_h:,
                                                                 :box_w].abs())
        f16 = torch.zeros(len(views), g16.shape[1], CANVAS[0] // 16, CANVAS[1] // 16)
        f32 = torch.zeros(len(views), g32.shape[1], CANVAS[0] // 32, CANVAS[1] // 32)
        f16[:1, :, : box_h // 16, : box_w // 16] = g16[:1]
        f32[:1, :, : box_h // 32, : box_w // 32] = g32[:1]
        if args.vflip:
            f16[1:, :, (CANVAS[0] - box_h) // 16:, : box_w // 16] = g16f
            f32[1:, :, (CANVAS[0] - box_h) // 32:, : box_w // 32] = g32f
        for v, view_canvas in enumerate(views):
            flipped = [(x, CANVAS[0] - 1 - y, r) for x, y, r in lesions] if v else lesions
            f16s.append(f16[v].half().numpy())
            f32s.append(f32[v].half().numpy())
            m16s.append(cell_mask(view_canvas, 16))
            m32s.append(cell_mask(view_canvas, 32))
            l16s.append(cell_labels(flipped, 16, f16.shape[2:], ring))
            l32s.append(cell_labels(flipped, 32, f32.shape[2:], ring))
            info.append({"id": record.id, "group": record.group, "label": record.label,
                         "malignant": int(record.malignant or 0), "laterality": record.laterality,
                         "flip": v, "has_lesions": bool(lesions),
                         "lesions": [[round(c, 2) for c in le] for le in flipped],
                         "placement": [placement.top, placement.bottom, placement.left,
                                       placement.right, placement.height, placement.width]})
        if index % 20 == 0:
            print(f"{index}/{len(records)} {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    np.savez(out / "features.npz", f16=np.stack(f16s), f32=np.stack(f32s), m16=np.stack(m16s),
             m32=np.stack(m32s), l16=np.stack(l16s), l32=np.stack(l32s))
    trunk_file = None if args.trunk is None else {"path": str(args.trunk),
                                                  "sha256": file_sha256(args.trunk)}
    (out / "info.json").write_text(json.dumps({"arch": args.arch, "canvas": CANVAS,
                                               "vflip": bool(args.vflip), "trunk": trunk_file,
                                               "pectoral": bool(args.pectoral),
                                               "pectoral_detector": args.pectoral_detector,
                                               "cell_mask_detector": mask_detector,
                                               "spacing_mm": SPACING_MM, "ring_mm": RING_MM,
                                               "wall_s": round(time.time() - started, 1),
                                               "images": info}))
    print(f"extracted {len(info)} views in {time.time() - started:.0f}s", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- head and scores

@dataclass
class Features:
    """Cached maps of the films (flip 0) and their vertical mirrors (flip 1)."""

    level: dict[str, np.ndarray]  # "16": (N, C, h, w) float16 ...
    mask: dict[str, np.ndarray]
    label: dict[str, np.ndarray]
    info: list[dict[str, Any]]

    @classmethod
    def load(cls, folder: Path) -> Features:
        data = np.load(folder / "features.npz")
        info = json.loads((folder / "info.json").read_text())["images"]
        return cls({"16": data["f16"], "32": data["f32"]}, {"16": data["m16"], "32": data["m32"]},
                   {"16": data["l16"], "32": data["l32"]}, info)


def level_stride(level: str) -> int:
    """Cell size in canvas pixels of a feature level ("16", "16c", "32")."""
    return int(level.rstrip("c"))


def cell_features(f16: torch.Tensor, f32: torch.Tensor, level: str) -> torch.Tensor:
    """Per-cell features of a level from the trunk's two maps, the same in the cache and in
    the bundle's network:
    "16": stride-16 block output + upsampled stride-32 output (cells of 6.4 mm);
    "16c": those + their 3 x 3-cell neighbourhood mean (19 mm of context around each cell);
    "32": stride-32 output + 2x2-pooled stride-16 output (cells of 12.8 mm)."""
    if level == "32":
        return torch.cat([f32, F.avg_pool2d(f16, 2)], 1)
    maps = torch.cat([f16, F.interpolate(f32, size=f16.shape[2:], mode="nearest")], 1)
    if level == "16c":
        context = F.avg_pool2d(maps, 3, 1, 1, count_include_pad=False)
        maps = torch.cat([maps, context], 1)
    return maps


def centre_maps(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each film's cell features minus their mean over its own breast cells, channel by channel
    (a film without breast cells unchanged). A linear head on them scores a cell by how far it
    stands out from the rest of the same breast: w . (x - mean x) + b = logit(x) - mean logit
    + b, so a shift of every cell of an image (how a detector renders it) leaves the score
    as it is. `nested --centre` (D1, a diagnostic); `final` refuses such a run."""
    out = np.empty_like(maps)
    for i in range(len(maps)):
        cells = mask[i]
        mean = maps[i][:, cells].mean(1) if cells.any() else np.zeros(maps.shape[1], maps.dtype)
        out[i] = maps[i] - mean[:, None, None]
    return out


CONTRA_WINDOW_MM = 32.0  # the other breast's features are averaged over about this square


def other_breast_row(info: list[dict[str, Any]]) -> list[int | None]:
    """Per row, the row of the same view of the other breast (same woman, same flip), or None."""
    index = {(d["group"], d["laterality"], d["flip"]): i for i, d in enumerate(info)}
    return [index.get((d["group"], "L" if d["laterality"] == "R" else "R", d["flip"]))
            for d in info]


def contra_cell_maps(maps: np.ndarray, mask: np.ndarray, info: list[dict[str, Any]],
                     stride: int) -> np.ndarray:
    """Each film's cell features followed by their difference from the other breast's at the same
    place: both breasts lie on the canvas chest wall left, each from the top-left corner of its
    own breast box, so a canvas cell is about the same place in both. The other breast's
    features there are its breast cells' mean over a window of about `CONTRA_WINDOW_MM` (how far
    two breasts' anatomy may lie apart on the canvas), or its whole breast's mean where no
    breast cell of it is in the window; a film without its pair gets a difference of 0. A
    finding in one breast only stands out in the difference, tissue both breasts share does not.
    `nested --contra-cells` (C1, a diagnostic); `final` refuses such a run."""
    k = max(1, int(round(CONTRA_WINDOW_MM / (stride * SPACING_MM)))) // 2 * 2 + 1
    out = np.empty((maps.shape[0], 2 * maps.shape[1], *maps.shape[2:]), dtype=maps.dtype)
    out[:, : maps.shape[1]] = maps
    for i, j in enumerate(other_breast_row(info)):
        if j is None:
            out[i, maps.shape[1]:] = 0.0
            continue
        cells = torch.from_numpy(mask[j].astype(np.float32))[None, None]
        values = torch.from_numpy(np.ascontiguousarray(maps[j]))[None] * cells
        total = F.avg_pool2d(values, k, 1, k // 2, count_include_pad=True)
        count = F.avg_pool2d(cells, k, 1, k // 2, count_include_pad=True)
        mean = (maps[j][:, mask[j]].mean(1) if mask[j].any()
                else np.zeros(maps.shape[1], maps.dtype))
        local = torch.where(count > 0, total / count.clamp_min(1e-6),
                            torch.from_numpy(mean)[None, :, None, None])
        out[i, maps.shape[1]:] = maps[i] - local[0].numpy()
    return out


def level_maps(feats: Features, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, C, h, w) float32, mask, labels) of a feature level (`cell_features`)."""
    f16 = torch.from_numpy(feats.level["16"]).float()
    f32 = torch.from_numpy(feats.level["32"]).float()
    grid = str(level_stride(level))
    return cell_features(f16, f32, level).numpy(), feats.mask[grid], feats.label[grid]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 200
                 ) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression (LBFGS), on standardised inputs."""
    xt = torch.from_numpy(x).float()
    yt = torch.from_numpy(y).float()
    pos = float(yt.sum())
    weight = torch.where(yt > 0, (len(yt) - pos) / max(pos, 1.0), torch.ones(()))
    weight = weight / weight.mean()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(xt @ w + b, yt, weight=weight)
                + l2 * (w * w).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


class CellModel:
    """Standardisation + logistic weights for one feature level."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, w: np.ndarray, b: float) -> None:
        self.mean, self.std, self.w, self.b = mean, std, w, b

    def logits(self, maps: np.ndarray) -> np.ndarray:
        """(N, C, h, w) -> (N, h, w) cell logits."""
        weight = (self.w / self.std).astype(np.float32)
        bias = np.float32(self.b - float((self.mean / self.std) @ self.w))
        return np.einsum("nchw,c->nhw", maps, weight, optimize=True) + bias


def training_cells(maps: np.ndarray, mask: np.ndarray, label: np.ndarray, idx: np.ndarray,
                   info: list[dict[str, Any]], negatives: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in idx:
        usable = mask[i] & (label[i] >= 0)
        if info[i]["label"] == 1 and not info[i]["has_lesions"]:
            continue
        pos = np.argwhere(usable & (label[i] == 1))
        neg = np.argwhere(usable & (label[i] == 0))
        if len(neg) > negatives:
            neg = neg[rng.choice(len(neg), negatives, replace=False)]
        for cells, y in ((pos, 1), (neg, 0)):
            if len(cells):
                xs.append(maps[i][:, cells[:, 0], cells[:, 1]].T)
                ys.append(np.full(len(cells), y, np.float32))
    return np.concatenate(xs), np.concatenate(ys)


def hard_negative_cells(model: CellModel, maps: np.ndarray, mask: np.ndarray, label: np.ndarray,
                        idx: np.ndarray, info: list[dict[str, Any]], per_film: int) -> np.ndarray:
    """Each training film's `per_film` background cells (breast, not lesion, not the ring round
    a lesion) that `model` scores highest, as feature rows: the cells a max-pooled score of a
    normal film comes from, so the cells where it raises false alarms (dense tissue, the
    muscle's edge). Films `training_cells` leaves out (abnormal without a circle) stay out."""
    rows = []
    for i in idx:
        if info[i]["label"] == 1 and not info[i]["has_lesions"]:
            continue
        background = mask[i] & (label[i] == 0)
        cells = np.argwhere(background)
        if not len(cells):
            continue
        logits = model.logits(maps[i][None])[0][cells[:, 0], cells[:, 1]]
        top = cells[np.argsort(-logits, kind="stable")[:per_film]]
        rows.append(maps[i][:, top[:, 0], top[:, 1]].T)
    return np.concatenate(rows) if rows else np.zeros((0, maps.shape[1]), np.float32)


def fit_cells(maps: np.ndarray, mask: np.ndarray, label: np.ndarray, idx: np.ndarray,
              info: list[dict[str, Any]], l2: float, seed: int, negatives: int = 48,
              hard: int = 0) -> CellModel:
    """The cell head: lesion cells against `negatives` random background cells per film
    (class-balanced logistic regression); with `hard` > 0, fitted again with each film's `hard`
    highest-scoring background cells under the first fit added as negatives (one round of hard
    negative mining; a cell drawn both ways counts twice)."""
    x, y = training_cells(maps, mask, label, idx, info, negatives, np.random.default_rng(seed))
    mean, std = x.mean(0), x.std(0) + 1e-3
    w, b = fit_logistic((x - mean) / std, y, l2)
    model = CellModel(mean, std, w, b)
    if hard <= 0:
        return model
    extra = hard_negative_cells(model, maps, mask, label, idx, info, hard)
    x = np.concatenate([x, extra])
    y = np.concatenate([y, np.zeros(len(extra), np.float32)])
    mean, std = x.mean(0), x.std(0) + 1e-3
    w, b = fit_logistic((x - mean) / std, y, l2)
    return CellModel(mean, std, w, b)


def fit_loc(maps: np.ndarray, mask: np.ndarray, label: np.ndarray, idx: np.ndarray,
            info: list[dict[str, Any]], l2: float, iters: int = 200) -> CellModel:
    """A localisation head: on every film of `idx` with a lesion circle, a softmax over its usable
    breast cells (ring cells left out) and the loss -log of the probability mass on its lesion
    cells, mean over films, + L2; the head learns to put a film's highest cell on its lesion
    against every other cell of the same film (each film's hardest negatives, not a sample of
    them). Films without a circle carry no localisation signal and are left out. Shift-invariant
    per film, so the bias is 0 (the bundle shifts the heatmap to the image score anyway)."""
    xs, pos, film = [], [], []
    for n, i in enumerate(j for j in idx if info[j]["has_lesions"]):
        usable = mask[i] & (label[i] >= 0)
        if not (usable & (label[i] == 1)).any():
            continue
        cells = np.argwhere(usable)
        xs.append(maps[i][:, cells[:, 0], cells[:, 1]].T)
        pos.append(label[i][cells[:, 0], cells[:, 1]] == 1)
        film.append(np.full(len(cells), n))
    x = np.concatenate(xs)
    mean, std = x.mean(0), x.std(0) + 1e-3
    xt = torch.from_numpy((x - mean) / std).float()
    post = torch.from_numpy(np.concatenate(pos))
    ids = torch.from_numpy(np.unique(np.concatenate(film), return_inverse=True)[1])
    films = int(ids.max()) + 1
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def segment_lse(z: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        top = torch.full((films,), -torch.inf).scatter_reduce(0, seg, z.detach(), "amax")
        total = torch.zeros(films).index_add(0, seg, torch.exp(z - top[seg]))
        return top + torch.log(total)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xt @ w
        loss = (segment_lse(z, ids) - segment_lse(z[post], ids[post])).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return CellModel(mean, std, w.detach().numpy(), 0.0)


def fit_head(maps: np.ndarray, mask: np.ndarray, label: np.ndarray, idx: np.ndarray,
             info: list[dict[str, Any]], l2: float, loss: str, seed: int) -> CellModel:
    """A cell head of either loss: "bce" (`fit_cells`) or "loc" (`fit_loc`)."""
    if loss == "loc":
        return fit_loc(maps, mask, label, idx, info, l2)
    return fit_cells(maps, mask, label, idx, info, l2, seed)


POOLINGS = ("max", "top3", "top10", "smooth3max")


def pool_scores(logits: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """(N, h, w) logits -> (N,) image scores over the breast cells."""
    out = np.empty(len(logits), np.float64)
    if pooling == "smooth3max":
        smoothed = F.avg_pool2d(torch.from_numpy(logits)[:, None], 3, 1, 1,
                                count_include_pad=False)[:, 0].numpy()
    for i in range(len(logits)):
        values = (smoothed[i] if pooling == "smooth3max" else logits[i])[mask[i]]
        if values.size == 0:
            values = logits[i].ravel()
        if pooling in ("max", "smooth3max"):
            out[i] = values.max()
        else:
            k = min(int(pooling[3:]), values.size)
            out[i] = np.sort(values)[-k:].mean()
    return out


def contralateral(scores: np.ndarray, info: list[dict[str, Any]], mode: str) -> np.ndarray:
    """"none": the score itself; "diff": minus half the other breast's score (same woman, same
    view, same flip), so a finding present in one breast only stands out."""
    if mode == "none":
        return scores
    out = scores.copy()
    for i, other in enumerate(other_breast_row(info)):
        if other is not None:
            out[i] = scores[i] - CONTRA_WEIGHT * scores[other]
    return out


def image_scores(logits: np.ndarray, mask: np.ndarray, info: list[dict[str, Any]],
                 pooling: str, contra: str, tta: bool) -> np.ndarray:
    """Scores of the films (flip 0), averaged with their mirrors' (flip 1) when `tta`."""
    scores = contralateral(pool_scores(logits, mask, pooling), info, contra)
    flips = np.array([d["flip"] for d in info])
    base = scores[flips == 0]
    if tta and (flips == 1).any():
        base = 0.5 * (base + scores[flips == 1])
    return base


PEAKS = ("raw", "smooth3", "erode", "smooth3-erode")
PEAK_TEXT = {
    "raw": "the head's cell probabilities on every breast cell",
    "smooth3": "each breast cell's logit averaged with its breast neighbours (3x3 cells)",
    "erode": "breast cells whose 8 neighbours are breast too (skin line and pectoral edge "
             "dropped)",
    "smooth3-erode": "3x3 breast-neighbour mean of the logits, on breast cells whose 8 "
                     "neighbours are breast too",
}


def heatmap_logits(logits: torch.Tensor, inside: torch.Tensor, peak: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The heatmap's cell logits and the cells it may be non-zero on, (B, 1, h, w) each, from the
    head's cell logits and the breast cells (`inside`, bool), as the bundle's network computes
    them: "raw" = the cell logits on every breast cell; "smooth3" = each breast cell's logit
    averaged with its breast neighbours (3 x 3 cells); "erode" = breast cells whose 8
    neighbours are breast cells too (the skin line and the pectoral edge dropped; the canvas
    edge, where the chest wall lies, does not erode; an image with no such cell keeps its
    breast cells)."""
    weight = inside.float()
    values = logits
    if peak.startswith("smooth3"):
        total = F.avg_pool2d(logits * weight, 3, 1, 1, count_include_pad=True)
        count = F.avg_pool2d(weight, 3, 1, 1, count_include_pad=True)
        values = torch.where(count > 0, total / count.clamp_min(1e-6), logits)
    allowed = inside
    if peak.endswith("erode"):
        eroded = -F.max_pool2d(-weight, 3, 1, 1) > 0.5
        keep = eroded.flatten(1).any(1).view(-1, 1, 1, 1)
        allowed = torch.where(keep, eroded, inside)
    return values, allowed


def peak_hits(logits: np.ndarray, mask: np.ndarray, info: list[dict[str, Any]], stride: int,
              peaks: list[tuple[float, float]] | None = None, peak: str = "raw"
              ) -> tuple[int, int, list[bool | None]]:
    """Heatmap peak (the `heatmap_logits` of `peak` on its allowed cells, film not mirror) inside
    a lesion circle (at least a cell); `peaks` receives each film's peak (x, y) in canvas pixels."""
    hits = total = 0
    per: list[bool | None] = []
    values, allowed = heatmap_logits(torch.from_numpy(np.ascontiguousarray(logits))[:, None].float(),
                                     torch.from_numpy(np.ascontiguousarray(mask))[:, None], peak)
    grids = torch.where(allowed, values, torch.tensor(-np.inf))[:, 0].numpy()
    for i, d in enumerate(info):
        if d["flip"]:
            continue
        grid = grids[i]
        r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
        px, py = (c + 0.5) * stride - 0.5, (r + 0.5) * stride - 0.5
        if peaks is not None:
            peaks.append((float(px), float(py)))
        if not d["lesions"]:
            per.append(None)
            continue
        hit = any((px - x) ** 2 + (py - y) ** 2 <= max(rad, stride / 2) ** 2
                  for x, y, rad in d["lesions"])
        per.append(bool(hit))
        hits += hit
        total += 1
    return hits, total, per


# ----------------------------------------------------------------------------- nested CV

GRID_LEVELS = ("16", "32", "16c")
GRID_L2 = (1e-3, 1e-2, 1e-1)
GRID_POOL = POOLINGS
GRID_CONTRA = ("none", "diff")
# heat-head losses and their L2 grids; the softmax loss is per film (about log(cells) ~ 6), ten
# times the per-cell logistic loss, so its L2 grid is ten times stronger (chosen before any run)
HEAT_LOSSES = ("bce", "loc")
HEAT_L2 = {"bce": GRID_L2, "loc": (1e-2, 1e-1, 1.0)}


def film_index(info: list[dict[str, Any]]) -> tuple[list[Record], np.ndarray]:
    """Light records of the films (flip 0) for grouped_folds, and map film -> its two rows."""
    films = [d for d in info if d["flip"] == 0]
    records = [Record(d["id"], Path(d["id"]), d["group"], d["laterality"], "MLO", d["label"],
                      d["malignant"], "left") for d in films]
    rows = {(d["id"], d["flip"]): i for i, d in enumerate(info)}
    pairs = np.array([[rows[(d["id"], 0)], rows.get((d["id"], 1), rows[(d["id"], 0)])]
                      for d in films])
    return records, pairs


@dataclass
class Level:
    """One feature level of one cached feature set (`name:level` in recipe keys)."""

    maps: np.ndarray
    mask: np.ndarray
    label: np.ndarray
    info: list[dict[str, Any]]
    pairs: np.ndarray  # film -> its rows (film, mirror) in this set
    arch: str
    stride: int
    # what the score heads (logistic, "bce") are fitted on and read from: `maps`, or with
    # `centre` each film's maps minus their mean over its breast cells (`centre_maps`); the
    # localisation heads are shift-invariant per film and always read `maps`
    score_maps: np.ndarray | None = None

    @property
    def scored(self) -> np.ndarray:
        return self.maps if self.score_maps is None else self.score_maps


def load_levels(folders: list[str], centre: bool = False, contra_cells: bool = False
                ) -> tuple[dict[str, Level], list[Record], dict[str, Any]]:
    """Every level of every feature folder (all on the same films), keyed `folder-name:level`;
    with `centre`, each level's score heads read per-film centred features (`centre_maps`),
    with `contra_cells` the features and their difference from the other breast's
    (`contra_cell_maps`)."""
    levels: dict[str, Level] = {}
    records: list[Record] = []
    metas: dict[str, Any] = {}
    for folder in folders:
        path = Path(folder)
        feats = Features.load(path)
        meta = json.loads((path / "info.json").read_text())
        films, pairs = film_index(feats.info)
        if records and [r.id for r in films] != [r.id for r in records]:
            raise SystemExit(f"{folder}: other films than {folders[0]}")
        records = films
        metas[path.name] = {k: v for k, v in meta.items() if k != "images"}
        metas[f"{path.name}-nomirror"] = {**metas[path.name], "vflip": False}
        for level in GRID_LEVELS:
            maps, mask, label = level_maps(feats, level)
            scored = centre_maps(maps, mask) if centre else None
            if contra_cells:
                scored = contra_cell_maps(maps, mask, feats.info, level_stride(level))
            levels[f"{path.name}:{level}"] = Level(maps, mask, label, feats.info, pairs,
                                                   meta["arch"], level_stride(level), scored)
            if meta.get("vflip"):  # the same set without its mirrors: mirrors become a choice
                alone = np.stack([pairs[:, 0], pairs[:, 0]], 1)
                levels[f"{path.name}-nomirror:{level}"] = Level(
                    maps, mask, label, feats.info, alone, meta["arch"], level_stride(level),
                    scored)
    return levels, records, metas


def evaluate_recipes(levels: dict[str, Level], train_films: np.ndarray, test_films: np.ndarray,
                     seed: int, l2s: tuple[float, ...] = GRID_L2,
                     hits: dict[Any, Any] | None = None, hard: int = 0
                     ) -> dict[tuple[Any, ...], np.ndarray]:
    """Scores of `test_films` under every recipe, each head fitted on `train_films` (films and,
    in a set with mirrors, their mirrors); with `hits`, the lesion hits of each head's heatmap
    peak on the test films too, under every `PEAKS` mode, keyed (features:level, L2, peak)."""
    out: dict[tuple[Any, ...], np.ndarray] = {}
    for key, lv in levels.items():
        rows = np.unique(lv.pairs[train_films].ravel())
        test_rows = np.unique(lv.pairs[test_films].ravel())
        sub_info = [lv.info[i] for i in test_rows]
        for l2 in l2s:
            model = fit_cells(lv.scored, lv.mask, lv.label, rows, lv.info, l2, seed, hard=hard)
            logits = model.logits(lv.scored[test_rows])
            if hits is not None:
                heat_hits(hits, (key, l2), "bce", logits, lv, test_rows, sub_info)
            for pooling, contra in itertools.product(GRID_POOL, GRID_CONTRA):
                # both films of a woman are in the same fold, so the other breast is there too
                # mirrors are training samples only: the film alone is scored, as the bundle does
                out[(key, l2, pooling, contra)] = image_scores(
                    logits, lv.mask[test_rows], sub_info, pooling, contra, tta=False)
        if hits is not None:
            for l2 in HEAT_L2["loc"]:
                model = fit_loc(lv.maps, lv.mask, lv.label, rows, lv.info, l2)
                heat_hits(hits, (key, l2), "loc", model.logits(lv.maps[test_rows]), lv, test_rows,
                          sub_info)
    return out


def heat_hits(hits: dict[Any, Any], head: tuple[str, float], loss: str, logits: np.ndarray,
              lv: Level, test_rows: np.ndarray, sub_info: list[dict[str, Any]]) -> None:
    """Lesion hits of one head's heatmap on the test films under every `PEAKS` mode, into `hits`
    keyed (features:level, L2, mode, loss)."""
    films = [d for d in sub_info if not d["flip"]]
    for peak in PEAKS:
        peaks: list[tuple[float, float]] = []
        hit, total, per = peak_hits(logits, lv.mask[test_rows], sub_info, lv.stride, peaks, peak)
        hits[(*head, peak, loss)] = (hit, total, per, peaks, [d["placement"] for d in films])


SPACES = {"single": ("none",), "contralateral": ("none", "diff")}


def choose_peak(hits: dict[tuple[Any, ...], int], key: str, l2: float) -> str:
    """The heatmap mode with the most lesion hits on held-out films for the head (`key`, `l2`)
    whose score recipe was chosen; ties go to the earlier, simpler mode in `PEAKS`."""
    return max(PEAKS, key=lambda p: (hits[(key, l2, p, "bce")], -PEAKS.index(p)))


def choose_heat(hits: dict[tuple[Any, ...], int], score_key: str, score_l2: float
                ) -> tuple[str, float, str, str]:
    """The heat head (features:level, L2, mode, loss) with the most lesion hits on held-out
    films, over every head fitted on the score head's feature set (the bundle runs one trunk),
    the score head's own included; ties go to the score head, then to the logistic loss, then to
    the simpler mode, then to the smaller L2."""
    trunk = score_key.split(":")[0]
    same = [k for k in hits if k[0].split(":")[0] == trunk]
    return max(same, key=lambda k: (hits[k], (k[0], k[1], k[3]) == (score_key, score_l2, "bce"),
                                    -HEAT_LOSSES.index(k[3]), -PEAKS.index(k[2]),
                                    -HEAT_L2[k[3]].index(k[1])))


def nested(args: argparse.Namespace) -> int:
    """Repeated nested CV. Every head is fitted once per (outer fold, inner fold) and scored
    under every pooling and contralateral mode; the inner choice is made separately within
    each selection space (`SPACES`: "single" = one image alone, what the bundle's contract
    ships; "contralateral" = the other breast's score may be used), so the two estimates come
    from the same folds and fits."""
    torch.set_num_threads(args.threads)
    levels, records, metas = load_levels(args.features.split(","), args.centre,
                                         args.contra_cells)
    labels = np.array([r.label for r in records])
    malignant = np.array([r.malignant or 0 for r in records])
    groups = np.array([r.group for r in records])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, list[dict[str, Any]]] = {space: [] for space in SPACES}
    all_inner: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        seed = SEED + repeat
        oof = {space: np.full(len(records), np.nan) for space in SPACES}
        chosen: dict[str, list[dict[str, Any]]] = {space: [] for space in SPACES}
        hits_total = {space: [0, 0] for space in SPACES}
        coupled_total = {space: [0, 0] for space in SPACES}
        film_hit: dict[str, list[Any]] = {space: [None] * len(records) for space in SPACES}
        film_peak: dict[str, list[Any]] = {space: [None] * len(records) for space in SPACES}
        film_place: dict[str, list[Any]] = {space: [None] * len(records) for space in SPACES}
        recipe_oof: dict[tuple[Any, ...], np.ndarray] = {}
        recipe_hits: dict[tuple[Any, ...], list[int]] = {}
        for fold, test in enumerate(grouped_folds(records, args.folds, seed)):
            test = np.array(sorted(test))
            train = np.setdiff1d(np.arange(len(records)), test)
            sub = [records[i] for i in train]
            inner_scores: dict[tuple[Any, ...], np.ndarray] = {}
            inner_hits: dict[tuple[Any, ...], int] = {}
            for inner_test in grouped_folds(sub, args.inner, seed + 100 + fold):
                it = train[np.array(sorted(inner_test))]
                itr = np.setdiff1d(train, it)
                fold_hits: dict[Any, Any] = {}
                for key, values in evaluate_recipes(levels, itr, it, seed, hits=fold_hits,
                                                    hard=args.hard_negatives).items():
                    inner_scores.setdefault(key, np.full(len(records), np.nan))[it] = values
                for key, found in fold_hits.items():
                    inner_hits[key] = inner_hits.get(key, 0) + found[0]
            inner_auc = {key: auc(labels[train], v[train]) for key, v in inner_scores.items()}
            outer_hits: dict[Any, Any] = {}
            outer = evaluate_recipes(levels, train, test, seed, hits=outer_hits,
                                     hard=args.hard_negatives)
            for key, values in outer.items():
                recipe_oof.setdefault(key, np.full(len(records), np.nan))[test] = values
            for key, found in outer_hits.items():
                counts = recipe_hits.setdefault(key, [0, 0])
                counts[0] += found[0]
                counts[1] += found[1]
            for space, contras in SPACES.items():
                allowed = {k: v for k, v in inner_auc.items() if k[3] in contras}
                best = max(allowed, key=lambda k: (allowed[k], -GRID_L2.index(k[1])))
                oof[space][test] = outer[best]
                peak = choose_peak(inner_hits, best[0], best[1])
                coupled = outer_hits[(best[0], best[1], peak, "bce")]
                heat = choose_heat(inner_hits, best[0], best[1])
                hit, total, per, peaks, places = outer_hits[heat]
                coupled_total[space][0] += coupled[0]
                coupled_total[space][1] += coupled[1]
                for k, film in enumerate(test):
                    film_hit[space][film] = per[k]
                    film_peak[space][film] = [round(v, 2) for v in peaks[k]]
                    film_place[space][film] = places[k]
                hits_total[space][0] += hit
                hits_total[space][1] += total
                chosen[space].append({"fold": fold, "recipe": list(best), "peak": peak,
                                      "heat": list(heat), "inner_heat_hits": inner_hits[heat],
                                      "coupled_hits": coupled[0],
                                      "inner_hits": {p: inner_hits[(best[0], best[1], p, "bce")]
                                                     for p in PEAKS},
                                      "inner_auc": round(allowed[best], 4),
                                      "test_auc": round(auc(labels[test], outer[best]), 4)})
                print(f"repeat {repeat} fold {fold} {space}: {best} inner {allowed[best]:.3f} "
                      f"test {auc(labels[test], outer[best]):.3f} heat {heat} hits {hit}/{total} "
                      f"({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
            all_inner.append({"repeat": repeat, "fold": fold,
                              "inner_auc": {"|".join(map(str, k)): round(v, 4)
                                            for k, v in inner_auc.items()}})
        for space in SPACES:
            scores = oof[space]
            low, high = bootstrap_auc_ci(labels, scores, groups, n=2000, seed=seed)
            mlow, mhigh = bootstrap_auc_ci(malignant, scores, groups, n=2000, seed=seed)
            hit = hits_total[space]
            results[space].append({
                "repeat": repeat, "seed": seed, "folds": chosen[space],
                "auc": round(auc(labels, scores), 4), "auc_ci95": [round(low, 4), round(high, 4)],
                "malignant_auc": round(auc(malignant, scores), 4),
                "malignant_auc_ci95": [round(mlow, 4), round(mhigh, 4)],
                "lesion_hits": hit, "lesion_hit_rate": round(hit[0] / max(1, hit[1]), 4),
                # the score head's own heatmap in its best mode (the rule before the heat head
                # was chosen apart from the score head)
                "lesion_hits_coupled": coupled_total[space],
                "oof": [round(float(v), 5) for v in scores],
                "hit": film_hit[space], "peak_canvas_xy": film_peak[space],
                "placement": film_place[space],
                # each fixed recipe's pooled outer-fold AUC: a diagnostic table, never a choice
                "recipes_outer_auc": {"|".join(map(str, k)): round(auc(labels, v), 4)
                                      for k, v in recipe_oof.items()},
                "recipes_outer_hits": {"|".join(map(str, k)): v for k, v in recipe_hits.items()},
            })
    (out / "nested.json").write_text(json.dumps({
        "features": args.features.split(","), "feature_sets": metas, "spaces": results,
        "inner": all_inner,
        "folds": args.folds, "inner_folds": args.inner, "hard_negatives": args.hard_negatives,
        "centre": bool(args.centre), "contra_cells": bool(args.contra_cells),
        "grid": {"level": sorted(levels), "l2": GRID_L2, "pooling": GRID_POOL,
                 "contra": GRID_CONTRA, "peak": PEAKS, "heat_l2": HEAT_L2},
        "ids": [r.id for r in records],
        "wall_s": round(time.time() - started, 1)}, indent=1))
    for space, reps in results.items():
        for r in reps:
            print(f"{space} repeat {r['repeat']}: AUC {r['auc']} {r['auc_ci95']} malignant "
                  f"{r['malignant_auc']} {r['malignant_auc_ci95']} hits {r['lesion_hits']}",
                  file=sys.stderr)
    return 0


def _conv1x1(weight: np.ndarray, bias: float) -> nn.Conv2d:
    head = nn.Conv2d(len(weight), 1, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32))[None, :, None, None])
        head.bias.fill_(float(bias))
    return head


@dataclass(frozen=True)
class HeadSpec:
    """One fitted per-cell head on a feature level: its folded weights and bias."""

    level: str
    weight: np.ndarray
    bias: float


def head_spec(model: CellModel, level: str) -> HeadSpec:
    """A fitted head with its standardisation folded into the weights and bias."""
    return HeadSpec(level, model.w / model.std,
                    model.b - float((model.mean / model.std) @ model.w))


class FeatureBounds(nn.Module):
    """A per-channel floor and ceiling on a level's cell features (B, C, H, W): the range the
    training films' breast cells span (`tools.model.ceiling` measures it), so a cell far outside
    it, as on images unlike the films, cannot push a linear head's logit further than the films'
    own features could (activation clipping, as ReAct, Sun et al. 2021, does for OOD inputs)."""

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lower", lower.reshape(1, -1, 1, 1).float())
        self.register_buffer("upper", upper.reshape(1, -1, 1, 1).float())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(maps, self.upper), self.lower)


class CellHeadModel(nn.Module):
    """The bundle's network: frozen trunk, per-cell linear heads, pooled image score.

    forward(x (B, 1, H, W) canvas in [0, 1]) -> (probability (B,), heatmap (B, 1, H, W)):
    breast cells are those whose canvas pixels are at least half non-zero (the canvas is 0
    outside the breast); the probability is the sigmoid of the score head's cell logits pooled
    over breast cells; the heatmap comes from the heat head (the score head itself unless
    another was chosen for localisation) in its `peak` mode (`heatmap_logits`), its logits
    multiplied by `heat_scale` (the score head's spread of cell logits over the heat head's, so
    a region's extent reads on the score head's scale) and shifted per image so that its highest
    cell equals the image's score logit (so an image at or above an operating point has a region
    at or above it, and one below has none), 0 off the allowed cells, resized to the canvas."""

    def __init__(self, trunk: LiteTrunk, score: HeadSpec, pooling: str, peak: str = "raw",
                 heat: HeadSpec | None = None, heat_scale: float = 1.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.level = score.level
        self.stride = level_stride(score.level)
        self.pooling = pooling
        self.peak = peak
        self.head = _conv1x1(score.weight, score.bias)
        self.heat_level = (heat or score).level
        self.heat_stride = level_stride(self.heat_level)
        self.heat_head = None if heat is None else _conv1x1(heat.weight, heat.bias)
        self.heat_scale = float(heat_scale)
        # per-level FeatureBounds (none in a shipped bundle; `tools.model.ceiling` sets them)
        self.bounds: dict[str, nn.Module] = {}
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # |x| is the image; the breast cells are where x > 0 (a bundle with
        # `input.cell_mask_detector` gets the breast its cells leave out negated)
        f16, f32 = self.trunk(x.abs())
        logits = self.head(self.features(f16, f32, self.level))
        inside = F.avg_pool2d((x > 0).float(), self.stride) >= 0.5
        pooled = logits
        if self.pooling == "smooth3max":
            pooled = F.avg_pool2d(logits, 3, 1, 1, count_include_pad=False)
        masked = pooled.masked_fill(~inside, -1.0e4).flatten(1)
        if self.pooling.startswith("top"):
            score = masked.topk(int(self.pooling[3:]), dim=1).values.mean(1)
        else:
            score = masked.amax(1)
        probability = torch.sigmoid(score)
        heat_logits, heat_inside = logits, inside
        if self.heat_head is not None:
            heat_logits = self.heat_head(self.features(f16, f32, self.heat_level))
            heat_inside = F.avg_pool2d((x > 0).float(), self.heat_stride) >= 0.5
        values, allowed = heatmap_logits(heat_logits, heat_inside, self.peak)
        values = values * self.heat_scale
        top = values.masked_fill(~allowed, -1.0e4).flatten(1).amax(1)
        values = values + (score - top).view(-1, 1, 1, 1)
        cells = torch.sigmoid(values) * allowed.float()
        heatmap = F.interpolate(cells, size=x.shape[2:], mode="bilinear", align_corners=False)
        return probability, heatmap

    def features(self, f16: torch.Tensor, f32: torch.Tensor, level: str) -> torch.Tensor:
        maps = cell_features(f16, f32, level)
        bounds = self.bounds.get(level)
        return maps if bounds is None else bounds(maps)


def select_recipe(levels: dict[str, Level], records: list[Record], folds: int, seed: int,
                  contras: tuple[str, ...] = GRID_CONTRA
                  ) -> tuple[tuple[Any, ...], tuple[str, float, str, str], dict[str, float], dict[str, int]]:
    """The recipe with the best grouped-CV AUC over `records` and the heat head with the most
    held-out lesion hits (the same rules as each outer fold's inner selection, here over all
    films: the shipped recipe)."""
    labels = np.array([r.label for r in records])
    every = np.arange(len(records))
    scores: dict[tuple[Any, ...], np.ndarray] = {}
    hits: dict[tuple[Any, ...], int] = {}
    for test in grouped_folds(records, folds, seed):
        test = np.array(sorted(test))
        fold_hits: dict[Any, Any] = {}
        for key, values in evaluate_recipes(levels, np.setdiff1d(every, test), test,
                                            seed, hits=fold_hits).items():
            scores.setdefault(key, np.full(len(records), np.nan))[test] = values
        for key, found in fold_hits.items():
            hits[key] = hits.get(key, 0) + found[0]
    aucs = {key: auc(labels, v) for key, v in scores.items() if key[3] in contras}
    best = max(aucs, key=lambda k: (aucs[k], -GRID_L2.index(k[1])))
    heat = choose_heat(hits, best[0], best[1])
    return (best, heat, {"|".join(map(str, k)): round(v, 4) for k, v in aucs.items()},
            {"|".join(map(str, k)): v for k, v in hits.items()})


def final(args: argparse.Namespace) -> int:
    """Select the shipped recipe (grouped CV over all films, the inner rule of `nested`), fit it
    on all films and write the bundle: predictions.jsonl, the calibration and the operating
    points come from repeat 0's nested out-of-fold predictions."""
    from node.bundle import LEGACY_SHA_KEY, PT2_FILE, file_sha256

    torch.set_num_threads(args.threads)
    started = time.time()
    nested_result = json.loads(Path(args.nested).read_text())
    for flag, name in (("centre", "--centre, a diagnostic (D1"),
                       ("contra_cells", "--contra-cells, a diagnostic (C1")):
        if nested_result.get(flag):
            raise SystemExit(f"nested.json was run with {name} in the bundle's experiments): "
                             "the bundle's network reads the plain cell features")
    levels, records, metas = load_levels(feature_folders(nested_result))
    if nested_result["ids"] != [r.id for r in records]:
        raise SystemExit("nested.json was run on other films")
    if nested_result.get("hard_negatives", 0):
        raise SystemExit("nested.json was run with --hard-negatives, a diagnostic: the recipe "
                         "selection, the shipped head and the fine-tuned trunk's heads "
                         "(topfit, tuned) fit without them, so no bundle is made from it")
    if any(meta.get("pectoral") is False for meta in metas.values()):
        raise SystemExit("features extracted with --no-pectoral: the worker cuts the pectoral "
                         "muscle where it finds it, so a bundle from them would not see what "
                         "it was trained on")
    if len({meta.get("pectoral_detector", 1) for meta in metas.values()}) > 1:
        raise SystemExit("the feature folders were extracted with different pectoral detectors")
    if len({cells_detector(meta) for meta in metas.values()}) > 1:
        raise SystemExit("the feature folders take their breast cells from different "
                         "detectors (--cell-mask-detector)")
    best, heat, selection_aucs, selection_hits = select_recipe(
        levels, records, args.folds, SEED + 1000, SPACES[args.space])
    key, l2, pooling, contra = best
    peak = heat[2]
    print(f"shipped recipe {best} heat head {heat}", file=sys.stderr)
    lv = levels[key]
    level = key.split(":")[1]
    meta = metas[key.split(":")[0]]
    maps, mask, label, info, pairs = lv.maps, lv.mask, lv.label, lv.info, lv.pairs
    stored = {r.id: r for r in mias_records(args.mias)}
    # predictions.jsonl: repeat 0's nested out-of-fold predictions (the recipe each outer fold's
    # inner CV chose, in the space shipped), from which the card's metrics, the calibration and the
    # operating points follow
    first = nested_result["spaces"][args.space][0]
    first_folds = grouped_folds(records, nested_result["folds"], first["seed"])
    fold_of = {int(i): f for f, idx in enumerate(first_folds) for i in idx}
    rows_out = []
    for film, record in enumerate(records):
        place = first["placement"][film]
        rows_out.append({
            "id": record.id, "group": record.group, "label": int(record.label),
            "malignant": int(record.malignant or 0), "fold": fold_of[film],
            "score": round(float(1 / (1 + np.exp(-first["oof"][film]))), 6),
            "hit": first["hit"][film],
            "peak_xy": stored_point(tuple(first["peak_canvas_xy"][film]), place,
                                    stored[record.id])})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows_out), encoding="utf-8")
    # the shipped head, on all films
    model = fit_cells(maps, mask, label, np.unique(pairs.ravel()), info, l2, SEED)
    heat_spec, heat_scale = None, 1.0
    if (heat[0], heat[1], heat[3]) != (key, l2, "bce"):  # a heat head chosen for localisation
        hv = levels[heat[0]]
        heat_model = fit_head(hv.maps, hv.mask, hv.label, np.unique(hv.pairs.ravel()), hv.info,
                              heat[1], heat[3], SEED)
        heat_spec = head_spec(heat_model, heat[0].split(":")[1])
        films, heat_films = pairs[:, 0], hv.pairs[:, 0]
        heat_scale = heat_scale_of(model.logits(maps[films]), mask[films],
                                   heat_model.logits(hv.maps[heat_films]), hv.mask[heat_films])
        print(f"heat head scale {heat_scale:.3f}", file=sys.stderr)
    net = CellHeadModel(LiteTrunk(meta["arch"]).for_inference(), head_spec(model, level),
                        pooling, peak, heat_spec, heat_scale)
    legacy = save_network(out, net, args.torchscript)
    wall = time.time() - started + sum(float(m.get("wall_s", 0)) for m in metas.values()) + float(
        nested_result.get("wall_s", 0))
    metadata = bundle_metadata(args, meta, nested_result, (level, l2, pooling, contra, heat),
                               selection_aucs, selection_hits, file_sha256(out / PT2_FILE), wall,
                               records, heat_scale)
    if legacy:
        metadata[LEGACY_SHA_KEY] = legacy
    if contra == "diff":  # pipelines/model.py: the other breast's score lowers this one's
        own = pool_scores(model.logits(maps[pairs[:, 0]]), mask[pairs[:, 0]], pooling)
        metadata[CONTRALATERAL_KEY] = {
            "weight": CONTRA_WEIGHT,
            "missing_other_logit": round(float(np.mean(own)), 6),
            "description": f"image logit and every heatmap cell's logit minus {CONTRA_WEIGHT} x "
                           "the image logit of the same view of the other breast in the same "
                           "study, before calibration; without that view, minus "
                           f"{CONTRA_WEIGHT} x the mean image logit of the training films "
                           "(missing_other_logit; never measured: every MIAS film has its pair)",
        }
    finish_bundle(out, metadata, rows_out, args.notes, args.threads, list(stored.values()))
    print(f"bundle written to {out} ({time.time() - started:.0f}s)", file=sys.stderr)
    return 0


def heat_scale_of(score_logits: np.ndarray, score_mask: np.ndarray, heat_logits: np.ndarray,
                  heat_mask: np.ndarray) -> float:
    """The factor on a heat head's logits that gives them the score head's spread: the standard
    deviation of the score head's cell logits over the films' breast cells over the heat
    head's."""
    spread = float(np.std(score_logits[score_mask]))
    return spread / max(float(np.std(heat_logits[heat_mask])), 1e-6)


def save_network(out: Path, net: nn.Module, torchscript: bool = True) -> str | None:
    """The bundle's network as `model.pt2` (any batch and box size) and, with `torchscript`, the
    TorchScript copy older workers load (an old copy is removed without it); the copy's sha256."""
    from node.bundle import MODEL_FILE, PT2_FILE, file_sha256
    from tools.model import export as ex

    program = export_canvas(net, CANVAS)
    program.example_inputs = None  # not needed to load or run: 3 MB less in git
    ex.save_exported(program, out / PT2_FILE)
    if torchscript:
        trace_canvas(net, CANVAS).save(str(out / MODEL_FILE))
        return file_sha256(out / MODEL_FILE)
    if (out / MODEL_FILE).exists():
        (out / MODEL_FILE).unlink()
    return None


def finish_bundle(out: Path, metadata: dict[str, Any], rows: list[dict[str, Any]],
                  notes_path: str | None, threads: int, records: list[Record]) -> None:
    """What every bundle build ends with, once the model files and predictions.jsonl (`rows`)
    are written: Platt calibration and operating points from the out-of-fold scores, the
    out-of-fold metrics within subgroups of `records` (breast density, finding class),
    metadata.json, the calibration plot, the worker's load check, the inference time, the card
    (with `notes_path`'s text), and the load check again."""
    from pipelines.model import load_bundle
    from tools.model import export as ex

    ex.calibrate_metadata(metadata, out / "predictions.jsonl")
    ex.add_subgroups(metadata, out / "predictions.jsonl", records)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    ex.save_calibration_plot(out / "calibration.png", rows, metadata)
    load_bundle(out, "cpu")
    metadata["training"]["inference"] = ex.measure_inference(out, threads)
    notes = Path(notes_path).read_text(encoding="utf-8") if notes_path else ""
    ex._write_bundle_texts(out, metadata, notes)
    load_bundle(out, "cpu")


def stored_point(point: tuple[float, float], placement: list[int], record: Record,
                 shape: tuple[int, int] = (1024, 1024)) -> list[float]:
    """A canvas point (x, y) in the stored film's pixels: back through the crop box, then the
    orientation flips (each its own inverse)."""
    from tools.model.dataset import record_orientation

    top, bottom, left, right, height, width = placement
    x = left + (point[0] + 0.5) * (right - left) / width - 0.5
    y = top + (point[1] + 0.5) * (bottom - top) / height - 0.5
    sx, sy = record_orientation(record).map_point(x, y, shape)
    return [round(sx, 1), round(sy, 1)]


def _canvas_samples(canvas: tuple[int, int], n: int, generator: torch.Generator) -> torch.Tensor:
    """Breast-like inputs: a positive region in the top-left, zeros around it."""
    x = torch.zeros(n, 1, *canvas)
    x[:, :, : canvas[0] * 2 // 3, : canvas[1] // 2] = 0.05 + 0.95 * torch.rand(
        n, 1, canvas[0] * 2 // 3, canvas[1] // 2, generator=generator)
    return x


def trace_canvas(model: nn.Module, canvas: tuple[int, int]) -> torch.jit.ScriptModule:
    """TorchScript trace at batch 2, checked against eager at batches 1 and 3."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        traced = torch.jit.trace(model, _canvas_samples(canvas, 2, generator), check_trace=False)
        for n in (1, 3):
            x = _canvas_samples(canvas, n, generator)
            for e, g in zip(model(x), traced(x), strict=True):
                if e.shape != g.shape or not torch.allclose(e, g, atol=1e-4):
                    raise SystemExit(f"traced model differs from eager at batch {n}")
    return traced


def export_canvas(model: nn.Module, canvas: tuple[int, int]) -> torch.export.ExportedProgram:
    """torch.export at batch 2 with a dynamic batch and dynamic height and width (multiples of
    32, from MIN_BOX_PX to the canvas: the worker feeds the breasts' box); checked against eager
    at batches 1 and 3 on the canvas and at batch 2 on a smaller box, on breast-like inputs (a
    positive region, zeros around it)."""
    from tools.model.export import EXPORT_ATOL

    generator = torch.Generator().manual_seed(0)

    def sample(n: int) -> torch.Tensor:
        x = torch.zeros(n, 1, *canvas)
        x[:, :, : canvas[0] * 2 // 3, : canvas[1] // 2] = 0.05 + 0.95 * torch.rand(
            n, 1, canvas[0] * 2 // 3, canvas[1] // 2, generator=generator)
        return x

    batch = torch.export.Dim("batch", min=1, max=1024)
    rows = 32 * torch.export.Dim("rows32", min=MIN_BOX_PX // 32, max=canvas[0] // 32)
    cols = 32 * torch.export.Dim("cols32", min=MIN_BOX_PX // 32, max=canvas[1] // 32)
    program = torch.export.export(model, (sample(2),),
                                  dynamic_shapes=({0: batch, 2: rows, 3: cols},))
    module = program.module()
    with torch.inference_mode():
        for n, h, w in ((1, canvas[0], canvas[1]), (3, canvas[0], canvas[1]),
                        (2, canvas[0] * 3 // 4, canvas[1] * 3 // 4 // 32 * 32)):
            x = sample(n)[:, :, :h, :w].contiguous()
            for e, g in zip(model(x), module(x), strict=True):
                if e.shape != g.shape or not torch.allclose(e, g, atol=EXPORT_ATOL * 10, rtol=0):
                    raise SystemExit(f"exported program differs from eager at {tuple(x.shape)}")
    return program


def feature_folders(nested_result: dict[str, Any]) -> list[str]:
    features = nested_result["features"]
    return [features] if isinstance(features, str) else list(features)


def extract_command(folder: str, meta: dict[str, Any]) -> str:
    mirrors = " --vflip" if meta.get("vflip") else ""
    pectoral = " --no-pectoral" if meta.get("pectoral") is False else ""
    if meta.get("pectoral_detector", 1) != 1:
        pectoral += f" --pectoral-detector {meta['pectoral_detector']}"
    if cells_detector(meta) != meta.get("pectoral_detector", 1):
        pectoral += f" --cell-mask-detector {cells_detector(meta)}"
    return (f"python -m tools.model.cells extract --mias ../shared/data/mias --out {folder} "
            f"--arch {meta.get('arch', 'efficientnet-lite0')}{mirrors}{pectoral} --threads 2")


def bundle_metadata(args: argparse.Namespace, meta: dict[str, Any], nested_result: dict[str, Any],
                    best: tuple[Any, ...], selection_aucs: dict[str, float],
                    selection_hits: dict[str, int], sha256: str, wall: float,
                    records: list[Record], heat_scale: float = 1.0) -> dict[str, Any]:
    from pipelines.quality import DOMAIN_KEY
    from tools.model import nets
    from tools.model.export import FORMAT_VERSION, MIAS_DATA

    level, l2, pooling, contra, heat = best
    peak = heat[2]
    heat_level = heat[0].split(":")[1]
    stride = level_stride(heat_level)
    heat_loss = heat[3] if len(heat) > 3 else "bce"
    own_heat = (heat[0].split(":")[1], heat[1], heat_loss) == (level, l2, "bce")
    heat_text = {"bce": "logistic", "loc": "per-film softmax localisation"}[heat_loss]
    reps = nested_result["spaces"][args.space]
    first = reps[0]
    hits = [sum(r["lesion_hits"][0] for r in reps), sum(r["lesion_hits"][1] for r in reps)]
    folds = nested_result["folds"]
    spread = [r["auc"] for r in reps]
    pooling_text = {"max": "maximum", "top3": "mean of the 3 highest",
                    "top10": "mean of the 10 highest",
                    "smooth3max": "maximum of the 3x3-smoothed"}[pooling]
    domain = {
        "description": "digitised screen-film mammograms (mini-MIAS), MLO views, resampled "
                       f"to {SPACING_MM} mm pixels from the image's own pixel spacing, shown "
                       "bright = dense",
        "modalities": ["MG"],
        "pixel_spacing_mm": [0.15, 0.25],
        "pixel_spacing_trained_mm": 0.2,
        "views": ["MLO"],
        "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
        "presentation_intents": ["FOR PRESENTATION"],
        "note": "MONOCHROME1 is inverted by the worker before scoring; every image is resampled "
                f"to {SPACING_MM} mm from its own pixel spacing, so a digital (FFDM) image is "
                "seen at the right physical scale, but digital detector pixel sizes (0.05-0.1 "
                "mm) stay outside the domain and are flagged: FFDM contrast, CC views and For "
                "Processing images were never seen in training",
    }
    return {
        "format_version": FORMAT_VERSION,
        "format": "pt2",
        "name": args.name,
        "version": args.version,
        "input": input_metadata(pectoral_detector=int(meta.get("pectoral_detector", 1)),
                                cell_mask_detector=cells_detector(meta)),
        "output": {
            "contract": "forward(x: float32 (B,1,H,W)) -> (probability (B,), heatmap (B,1,H,W))",
            "heatmap_size": list(CANVAS),
            # pipelines/model.py: the worker keeps the source-grid map's peak at the score
            "heatmap_peak": "score",
            "score": "probability of an abnormality needing work-up, benign or malignant",
            "heatmap": f"per-cell lesion likelihood in [0, 1] ({stride}-pixel cells, "
                       f"{stride * SPACING_MM:.1f} mm), 0 off the breast, on the input canvas "
                       "(linear lesion head on frozen ImageNet features"
                       + ("" if own_heat else f", {heat_text} head, level {heat_level}, L2 "
                          f"{heat[1]:g}, chosen for "
                          f"localisation, logits x {heat_scale:.3f} to the score head's spread")
                       + f"; cells: {PEAK_TEXT[peak]}), shifted per image so that its highest "
                       "cell is the image score",
        },
        DOMAIN_KEY: domain,
        "operating_points": {"balanced": 0.5, "high_sensitivity": 0.5},
        "metrics": {
            "split": f"nested cross-validation: {len(reps)} repeats x {folds} outer folds grouped "
                     f"by woman (left/right pair) and stratified (malignant / benign only / "
                     f"normal women), seeds {[r['seed'] for r in reps]}; inside each outer "
                     f"training part a {nested_result['inner_folds']}-fold grouped inner CV "
                     "chose the recipe (feature set, level, L2, score pooling"
                     + (", contralateral or not" if args.space == "contralateral" else
                        "; one image alone") + ") by "
                     "inner out-of-fold AUC, and the heat head (level, loss, L2, heatmap mode) by "
                     "inner held-out lesion hits; each outer test fold scored once with the recipe "
                     "its inner CV chose. Reported: repeat 0's pooled outer-fold predictions; "
                     f"the repeats' AUCs {spread} give the spread",
            "normal_vs_abnormal_auc": first["auc"],
            "normal_vs_abnormal_auc_ci95": first["auc_ci95"],
            "malignant_vs_rest_auc": first["malignant_auc"],
            "malignant_vs_rest_auc_ci95": first["malignant_auc_ci95"],
            "fold_aucs": [f["test_auc"] for f in first["folds"]],
            "repeat_aucs": spread,
            "repeat_malignant_aucs": [r["malignant_auc"] for r in reps],
            "lesion_hit_rate": first["lesion_hit_rate"],
            "lesion_hits": first["lesion_hits"],
            "lesion_hits_all_repeats": hits,
            "ci_method": "bootstrap over groups (women), 2000 rounds, percentile",
            "recipes_chosen": [[f["recipe"] + [f.get("heat", f.get("peak", "raw"))]
                                for f in r["folds"]] for r in reps],
            "lesion_hits_score_head": first.get("lesion_hits_coupled"),
            "by_space": {space: {
                "repeat_aucs": [r["auc"] for r in rs],
                "auc_ci95_repeat0": rs[0]["auc_ci95"],
                "repeat_malignant_aucs": [r["malignant_auc"] for r in rs],
                "malignant_auc_ci95_repeat0": rs[0]["malignant_auc_ci95"],
                "repeat_lesion_hits": [r["lesion_hits"] for r in rs],
            } for space, rs in nested_result["spaces"].items()},
        },
        "training": {
            "data": MIAS_DATA,
            "images": len(records), "abnormal": int(sum(r.label for r in records)),
            "malignant": int(sum(int(r.malignant or 0) for r in records)),
            "groups": len({r.group for r in records}),
            "arch": f"{meta['arch']}-frozen+cell-logistic",
            "arch_config": {"arch": meta["arch"], "pretrained": True, "frozen": True,
                            "mirrors": bool(meta.get("vflip")),
                            "level": level, "l2": l2, "pooling": pooling,
                            "contralateral": contra, "heat_head": {
                                "level": heat_level, "l2": heat[1], "mode": peak,
                                "loss": heat_loss,
                                "own": own_heat, "scale": round(heat_scale, 4)},
                            "canvas": list(CANVAS),
                            "pixel_spacing_mm": SPACING_MM},
            "architecture": f"{meta['arch']} (ImageNet weights, frozen, stem to last block) as a "
                            "fully convolutional feature extractor; per-cell features "
                            + {"16": "stride-16 block output + upsampled stride-32 output",
                               "16c": "stride-16 block output + upsampled stride-32 output and "
                                      "their 3x3-cell neighbourhood mean",
                               "32": "stride-32 block output + 2x2-pooled stride-16 output"}[level]
                            + f"; a logistic lesion head per cell (1x1 convolution, L2 {l2:g}); "
                            f"image score = sigmoid of the {pooling_text} cell logits inside "
                            "the breast",
            "supervision": "cells whose centre lies inside a lesion circle = lesion; cells within "
                           f"the radius + {RING_MM:g} mm ignored; every other breast cell of every "
                           "film = background (48 sampled per film); off-breast cells and films "
                           "with an abnormality but no circle ignored; class-balanced logistic "
                           "loss, LBFGS" + ("" if heat_loss == "bce" else
                                            "; heat head: on each film with a circle, a softmax "
                                            "over its usable breast cells, loss -log of the mass "
                                            "on its lesion cells (every other cell of the film "
                                            "a negative), LBFGS"),
            "augmentation": ("each film's vertical mirror (the chest wall stays left) cached "
                             "as a second training sample; the film alone is scored"
                             if meta.get("vflip") else "none (the trunk is frozen, the head "
                             "fitted on the cached features of the films)"),
            "schedule": "LBFGS to convergence (at most 200 iterations) on cached features; "
                        f"recipe chosen by {folds}-fold grouped CV over all films "
                        f"(shipped: level {level}, L2 {l2:g}, pooling {pooling}, contralateral "
                        f"{contra}), then the heat head (level, L2, mode) by the same CV's "
                        f"lesion hits (shipped: {heat_level}, {heat[1]:g}, {peak}, "
                        f"{heat_text} loss)",
            "recipe_selection_aucs": selection_aucs,
            "heatmap_selection_hits": selection_hits,
            "seed": SEED,
            "command": " && ".join(
                [extract_command(folder, nested_result.get("feature_sets", {}).get(
                    Path(folder).name, meta)) for folder in feature_folders(nested_result)]
                + [f"python -m tools.model.cells nested --features "
                   f"{','.join(feature_folders(nested_result))} --out "
                   f"{Path(args.nested).parent} --threads 2"]),
            "export_command": "python -m tools.model.cells final " + " ".join(
                sys.argv[2:] if sys.argv[1:2] == ["final"] else []),
            "weights": nets.LITE_WEIGHTS_LICENCE,
            "torch": torch.__version__,
            "machine": "x86_64, 2 threads (shared)",
            "device": "cpu",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_time_s": round(wall, 1),
        },
        "model_sha256": sha256,
    }


def report(args: argparse.Namespace) -> int:
    """Markdown tables of a nested run: the nested estimates per selection space, the recipes
    each outer fold chose, and every fixed recipe's pooled outer-fold AUC (mean over repeats;
    a diagnostic of the whole grid, never used to choose)."""
    result = json.loads(Path(args.nested).read_text())
    lines = [f"Nested run `{args.nested}` (features {', '.join(feature_folders(result))}; "
             f"{result['folds']} outer x {result['inner_folds']} inner folds; wall "
             f"{result['wall_s'] / 60:.1f} min)", "",
             "| selection space | repeat | normal vs abnormal AUC (95 % CI) | malignant vs rest "
             "(95 % CI) | lesion hits | recipes chosen (outer folds) |", "|---|---|---|---|---|---|"]
    for space, reps in result["spaces"].items():
        for r in reps:
            chosen = "; ".join(" ".join(str(v) for v in f["recipe"]) + " / heat " + " ".join(
                str(v) for v in f.get("heat", [f.get("peak", "raw")])) for f in r["folds"])
            coupled = r.get("lesion_hits_coupled")
            lines.append(
                f"| {space} | {r['repeat']} | {r['auc']:.3f} ({r['auc_ci95'][0]:.3f}–"
                f"{r['auc_ci95'][1]:.3f}) | {r['malignant_auc']:.3f} "
                f"({r['malignant_auc_ci95'][0]:.3f}–{r['malignant_auc_ci95'][1]:.3f}) | "
                f"{r['lesion_hits'][0]}/{r['lesion_hits'][1]}"
                + (f" (score head's own map: {coupled[0]}/{coupled[1]})" if coupled else "")
                + f" | {chosen} |")
    reps = next(iter(result["spaces"].values()))
    keys = list(reps[0]["recipes_outer_auc"])
    columns = [(p, c) for c in GRID_CONTRA for p in GRID_POOL]
    rows = sorted({tuple(k.split("|")[:2]) for k in keys})
    lines += ["", "Every fixed recipe, pooled outer-fold AUC, mean of the repeats (diagnostic "
              "only: no choice was made on it):", "",
              "| features:level | L2 | " + " | ".join(f"{p} {c}" for p, c in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for level, l2 in rows:
        cells = []
        for pooling, contra in columns:
            key = f"{level}|{l2}|{pooling}|{contra}"
            cells.append(f"{np.mean([r['recipes_outer_auc'][key] for r in reps]):.3f}")
        lines.append(f"| {level} | {l2} | " + " | ".join(cells) + " |")
    if "recipes_outer_hits" in reps[0]:
        lines += ["", "Every fixed head and heatmap mode, lesion hits on the outer folds, sum over "
                  "the repeats (diagnostic only):", "",
                  "| features:level | loss | L2 | " + " | ".join(PEAKS) + " |",
                  "|---|---|---|" + "---|" * len(PEAKS)]
        heads = sorted({(k.split("|")[0], (k.split("|") + ["bce"])[3], k.split("|")[1])
                        for k in reps[0]["recipes_outer_hits"]},
                       key=lambda h: (h[0], HEAT_LOSSES.index(h[1]), float(h[2])))
        for level, loss, l2 in heads:
            cells = []
            for peak in PEAKS:
                key = f"{level}|{l2}|{peak}" + ("" if loss == "bce" and f"{level}|{l2}|{peak}"
                                                in reps[0]["recipes_outer_hits"] else f"|{loss}")
                found = [r["recipes_outer_hits"][key] for r in reps]
                cells.append(f"{sum(f[0] for f in found)}/{sum(f[1] for f in found)}")
            lines.append(f"| {level} | {loss} | {l2} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Two nested runs on the same films and seeds (`--base`, then `--other`), repeat by repeat:
    their AUCs, lesion hits and the paired AUC difference (other minus base) with its 95 %
    interval, bootstrapping women (2000 rounds, the repeat's seed), normal vs abnormal and
    malignant vs rest; a markdown table on stdout."""
    base, other = (json.loads(Path(path).read_text()) for path in (args.base, args.other))
    if base["ids"] != other["ids"]:
        raise SystemExit("the two nested runs scored different films")
    folder = base["features"][0] if isinstance(base["features"], list) else base["features"]
    records, _ = film_index(json.loads((Path(folder) / "info.json").read_text())["images"])
    if [r.id for r in records] != base["ids"]:
        raise SystemExit(f"{folder} holds other films than the nested runs")
    labels = np.array([r.label for r in records])
    malignant = np.array([r.malignant or 0 for r in records])
    groups = np.array([r.group for r in records])
    print("| repeat | AUC base / other | paired difference (95 % CI) | malignant vs rest base / "
          "other | paired difference (95 % CI) | lesion hits base / other |")
    print("|---|---|---|---|---|---|")
    totals = np.zeros((2, 2), dtype=int)
    aucs = []
    for a, b in zip(base["spaces"][args.space], other["spaces"][args.space], strict=True):
        if a["seed"] != b["seed"]:
            raise SystemExit(f"repeat {a['repeat']} was run with other seeds")
        cells = [f"{a['repeat']}", f"{a['auc']:.3f} / {b['auc']:.3f}"]
        for truth, key in ((labels, "auc"), (malignant, "malignant_auc")):
            diff, low, high = bootstrap_auc_difference(truth, b["oof"], a["oof"], groups,
                                                       n=2000, seed=a["seed"])
            if key == "malignant_auc":
                cells.append(f"{a[key]:.3f} / {b[key]:.3f}")
            cells.append(f"{diff:+.3f} ({low:+.3f} to {high:+.3f})")
        cells.append(f"{a['lesion_hits'][0]} / {b['lesion_hits'][0]} of {a['lesion_hits'][1]}")
        totals += [a["lesion_hits"], b["lesion_hits"]]
        aucs.append((a["auc"], b["auc"]))
        print("| " + " | ".join(cells) + " |")
    mean_a, mean_b = np.mean(aucs, axis=0)
    print(f"\nmean AUC {mean_a:.4f} / {mean_b:.4f} (difference {mean_b - mean_a:+.4f}); lesion "
          f"hits {totals[0, 0]} / {totals[1, 0]} of {totals[0, 1]}")
    if args.mias:
        compare_by_density(base, other, args.space, labels, mias_records(args.mias))
    return 0


def compare_by_density(base: dict[str, Any], other: dict[str, Any], space: str,
                       labels: np.ndarray, records: list[Record]) -> None:
    """Each run's specificity within each breast density (mini-MIAS background tissue), repeat
    by repeat, at the run's own balanced point (Youden's J on that repeat's out-of-fold scores,
    the rule a bundle's point is chosen by); a markdown table on stdout."""
    from tools.model.evaluate import DENSITY_NAMES
    from tools.model.metrics import operating_points

    density_of = {r.id: r.density for r in records}
    density = np.array([density_of[i] for i in base["ids"]])
    codes = [c for c in DENSITY_NAMES if (density == c).any()]
    print("\n| repeat | run | balanced point: sensitivity / specificity | "
          + " | ".join(f"specificity {DENSITY_NAMES[c]} normals" for c in codes) + " |")
    print("|---|---|---|" + "---|" * len(codes))
    means: dict[str, list[list[float]]] = {"base": [], "other": []}
    for a, b in zip(base["spaces"][space], other["spaces"][space], strict=True):
        for name, run in (("base", a), ("other", b)):
            scores = np.array(run["oof"], dtype=np.float64)
            point = operating_points(labels, scores)["balanced"]
            below = scores < point["threshold"]
            specs = []
            for code in codes:
                normals = (labels == 0) & (density == code)
                specs.append(float(below[normals].mean()))
            means[name].append(specs)
            print(f"| {run['repeat']} | {name} | {point['sensitivity']:.3f} / "
                  f"{point['specificity']:.3f} | "
                  + " | ".join(f"{v:.3f} ({int(round(v * n))}/{n})" for v, n in zip(
                      specs, [int(((labels == 0) & (density == c)).sum()) for c in codes],
                      strict=True)) + " |")
    for name, rows in means.items():
        print(f"{name}: mean specificity over the repeats "
              + ", ".join(f"{DENSITY_NAMES[c]} {v:.3f}" for c, v in zip(
                  codes, np.mean(rows, axis=0), strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.model.cells", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extract")
    ext.add_argument("--mias", required=True)
    ext.add_argument("--out", required=True)
    ext.add_argument("--arch", default="efficientnet-lite0", choices=sorted(BLOCK16))
    ext.add_argument("--vflip", action=argparse.BooleanOptionalAction, default=False)
    ext.add_argument("--threads", type=int, default=2)
    ext.add_argument("--pectoral", action=argparse.BooleanOptionalAction, default=True,
                     help="cut the pectoral muscle where pipelines/breast.py finds it, as the "
                          "worker does; --no-pectoral never looks for it (an ablation: such "
                          "features cannot make a bundle)")
    ext.add_argument("--pectoral-detector", type=int, choices=(1, 2), default=1,
                     help="pipelines/breast.py's pectoral search: 1 (the row-by-row edge, the "
                          "shipped bundles'), 2 (then the straight-line search where 1 finds "
                          "none); a bundle made from the features declares it")
    ext.add_argument("--cell-mask-detector", type=int, choices=(1, 2), default=None,
                     help="the cells counted as breast (pooling, training, heatmap peak) "
                          "are those this pectoral detector leaves, on the canvas of "
                          "--pectoral-detector (the pixels it leaves out negated); a bundle "
                          "made from the features declares it (input.cell_mask_detector)")
    ext.add_argument("--trunk", type=Path, default=None,
                     help="a fine-tuned trunk (`topfit --final`'s trunk.pt) instead of ImageNet's")
    nst = sub.add_parser("nested")
    nst.add_argument("--features", required=True)
    nst.add_argument("--out", required=True)
    nst.add_argument("--repeats", type=int, default=3)
    nst.add_argument("--folds", type=int, default=5)
    nst.add_argument("--inner", type=int, default=4)
    nst.add_argument("--threads", type=int, default=2)
    diagnostic = nst.add_mutually_exclusive_group()  # each replaces what the score heads read
    diagnostic.add_argument("--contra-cells", action="store_true",
                     help="C1, a diagnostic: the score heads read each film's cell features and "
                          "their difference from the other breast's at the same place "
                          "(`contra_cell_maps`); `final` refuses such a run")
    diagnostic.add_argument("--centre", action="store_true",
                     help="a diagnostic (D1): fit and read the score heads on each film's cell "
                          "features minus their mean over its breast cells (`centre_maps`); "
                          "final refuses such a run")
    nst.add_argument("--hard-negatives", type=int, default=0, metavar="K",
                     help="fit every score head a second time with each training film's K "
                          "highest-scoring background cells added as negatives (default 0: "
                          "random background cells only, as every bundle so far)")
    fin = sub.add_parser("final")
    fin.add_argument("--nested", required=True, help="nested.json of the nested run")
    fin.add_argument("--out", required=True)
    fin.add_argument("--mias", required=True, help="the films (their orientation, for peak_xy)")
    fin.add_argument("--name", default="mias-baseline")
    fin.add_argument("--version", default="0.4.0")
    fin.add_argument("--notes", default=None)
    fin.add_argument("--space", default="single", choices=sorted(SPACES),
                     help="single: one image alone; contralateral: the other breast's score may "
                          "be used (the worker pairs the views of a study)")
    fin.add_argument("--folds", type=int, default=5)
    fin.add_argument("--threads", type=int, default=2)
    fin.add_argument("--torchscript", action=argparse.BooleanOptionalAction, default=True,
                     help="also write model.ts, a TorchScript copy")
    rep = sub.add_parser("report")
    rep.add_argument("--nested", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--base", required=True, help="nested.json of the reference run")
    cmp.add_argument("--other", required=True, help="nested.json of the run compared with it")
    cmp.add_argument("--space", default="contralateral", choices=sorted(SPACES))
    cmp.add_argument("--mias", default=None,
                     help="mini-MIAS folder: also each run's specificity by breast density at "
                          "its own balanced point")
    args = parser.parse_args(argv)
    return {"extract": extract, "nested": nested, "final": final, "report": report,
            "compare": compare}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

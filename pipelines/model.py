"""The model bundle: checked when loaded, run in batches, heatmaps mapped back to the source grid.

A bundle is a folder with `metadata.json` and the model: `model.pt2` (a `torch.export`
ExportedProgram, `"format": "pt2"`) or, from bundles exported before it, `model.ts` (TorchScript,
deprecated: it loads, with one `model_format_deprecated` warning). Nothing is ever downloaded and
nothing falls back to random weights: a missing or mismatched bundle is a ModelError, which stops
the worker. When the metadata has a `calibration` (pipelines/calibration.py), the image scores
and the heatmaps are reported on its calibrated scale, the scale of the operating points.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from node.bundle import (
    METADATA_FILE,
    check_bundle_files,
    model_format,
    model_path,
    read_bundle_metadata,
)
from node.errors import ModelError
from node.logs import get_logger
from pipelines.calibration import Calibration
from pipelines.preprocess import (
    Placement,
    build_preprocess,
    canvas_input,
    input_size,
    mask_heatmap,
    prepare_image,
    uses_canvas,
)
from pipelines.results import ModelIdentity

DEFAULT_OPERATING_POINT = "balanced"
CONTRALATERAL_KEY = "contralateral"  # metadata.json: read each breast against the other
# metadata.json output.heatmap_peak = "score": the bundle's heatmap peaks at the image's score
HEATMAP_PEAK_KEY = "heatmap_peak"
MAX_CPU_THREADS = 4

log = get_logger("pipelines.model")


@dataclass(frozen=True)
class ViewPrediction:
    """The model's answer for one image, on that image's own pixel grid."""

    probability: float
    heatmap: np.ndarray  # float32 in [0, 1], exactly the shape of the image given to predict


def read_metadata(bundle_dir: Path) -> dict[str, Any]:
    """metadata.json (its generic checks in node/bundle.py), checked for what the runner relies on."""
    metadata = read_bundle_metadata(bundle_dir)
    path = bundle_dir / METADATA_FILE
    try:
        height, width = input_size(metadata)
        intensity = metadata["input"]["intensity"]
        float(intensity["lower_percentile"]), float(intensity["upper_percentile"])
        float(metadata["operating_points"][DEFAULT_OPERATING_POINT])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path}: input/operating_points incomplete ({error!r})") from None
    spacing = metadata["input"].get("pixel_spacing_mm")
    if spacing is not None and not (isinstance(spacing, (int, float)) and 0.01 <= spacing <= 5):
        raise ModelError(f"{path}: input.pixel_spacing_mm {spacing!r} is not a size in mm")
    if spacing is not None and (height % 32 or width % 32):
        raise ModelError(f"{path}: canvas {height}x{width} is not a multiple of 32")
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise ModelError(f"{path}: input size {height}x{width} out of range")
    if metadata["input"].get("orientation") != "chest_wall_left":
        raise ModelError(f"{path}: input.orientation must be 'chest_wall_left' "
                         f"(got {metadata['input'].get('orientation')!r})")
    box = metadata["input"].get("content_box")
    if box is not None:
        try:
            multiple, context = int(box["multiple"]), int(box["context_px"])
            smallest = int(box.get("min_px", multiple))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"{path}: input.content_box incomplete ({error!r})") from None
        if (spacing is None or multiple < 1 or height % multiple or width % multiple
                or context < 0 or not multiple <= smallest <= min(height, width)):
            raise ModelError(f"{path}: input.content_box {box!r} does not fit the "
                             f"{height}x{width} canvas of a physical-canvas bundle")
    contra = metadata.get(CONTRALATERAL_KEY)
    if contra is not None:
        try:
            float(contra["weight"]), float(contra["missing_other_logit"])
        except (KeyError, TypeError, ValueError) as error:
            raise ModelError(f"{path}: {CONTRALATERAL_KEY} incomplete ({error!r})") from None
    try:
        Calibration.from_metadata(metadata)
    except ModelError as error:
        raise ModelError(f"{path}: {str(error).removeprefix('metadata.json: ')}") from None
    return metadata


def resolve_device(device: str) -> torch.device:
    """"auto" prefers CUDA; asking for CUDA where there is none stops startup (no silent CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"model.device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def cpu_threads() -> int:
    """The CPUs this process may use (container limits included), at most MAX_CPU_THREADS:
    a small network gains little beyond that, and each Celery worker process runs its own."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_CPU_THREADS))


def heatmap_to_image_grid(heatmap: np.ndarray | torch.Tensor, rows: int, cols: int,
                          calibration: Calibration | None = None,
                          placement: Placement | None = None) -> np.ndarray:
    """Map a model-grid heatmap to the image's exact rows x cols (then calibrate it, when the
    bundle is calibrated: after the resize, so a region at or above a calibrated threshold is
    exactly the region of the raw map at or above the raw one).

    Without `placement` the preprocessing resized the whole image (no crop, no padding), so
    model cell (i, j) covers image rows [i, i+1) * rows / H and columns [j, j+1) * cols / W;
    bilinear resizing with align_corners=False keeps those cell centres where they belong. With
    a `Placement` (a physical-canvas bundle: breast crop resampled into the canvas's top-left
    corner) the canvas's content region is resized back onto the crop box, clamped and
    calibrated there, and the rest of the image is 0 (off the breast: the caller masks the
    breast afterwards).
    """
    tensor = torch.as_tensor(heatmap, dtype=torch.float32)
    while tensor.ndim < 4:
        tensor = tensor[None]
    def finish(values: torch.Tensor) -> torch.Tensor:
        values = values.clamp_(0.0, 1.0)
        if calibration is not None:
            calibration.tensor_(values)
        return values

    if placement is None:
        resized = F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False)
        grid = finish(resized[0, 0])
    else:
        if (placement.rows, placement.cols) != (rows, cols):
            raise ValueError(f"placement for {placement.rows}x{placement.cols}, image {rows}x{cols}")
        grid = placement.to_source(tensor[0, 0], finish)
    return grid.cpu().numpy().astype(np.float32, copy=False)


def content_box(metadata: dict[str, Any], placement: Placement | None) -> tuple[int, int]:
    """Rows and columns of the canvas the network is run on for one image: the whole canvas,
    or, for a bundle with `input.content_box` (a fully convolutional network exported for any
    size that is a multiple of `multiple`), the top-left box holding the image's content region
    plus `context_px` of padding, rounded up to `multiple` and at least `min_px`: the box the
    bundle's features were computed on in training. The canvas is 0 off the breast and the
    network's heatmap 0 off the breast cells, so the rest of the canvas adds nothing but time.
    The box is the image's own, never its batch's: the network sees the canvas's zero padding
    and its own edge differently, so a score must not depend on the other images in a batch."""
    height, width = input_size(metadata)
    spec = metadata["input"].get("content_box")
    if not spec or placement is None:
        return height, width
    multiple, context = int(spec["multiple"]), int(spec["context_px"])
    smallest = int(spec.get("min_px", multiple))

    def fit(extent: int, limit: int) -> int:
        return min(limit, max(smallest, -(-(extent + context) // multiple) * multiple))

    return fit(placement.height, height), fit(placement.width, width)


def _logit(values: torch.Tensor) -> torch.Tensor:
    clamped = values.clamp(1e-6, 1.0 - 1e-6)
    return torch.log(clamped) - torch.log1p(-clamped)


def lift_peak_to_score(heatmap: np.ndarray, probability: float,
                       placement: Placement | None = None) -> np.ndarray:
    """For a bundle whose heatmap peaks at the image's score (`output.heatmap_peak` "score"):
    the source-grid heatmap, in place, with the logits of its non-zero pixels raised by one
    amount so that its highest pixel is the score again. The network's cells hold the score
    exactly, but the pixels of a bilinear map only approach a cell's value near its centre, and
    at a sharp peak next to low or off-breast cells (a 6.4 mm cell, 0.98 against neighbours of
    0.6 and 0) the highest pixel lands 1 logit or more below it, so a view at or above an
    operating point could come out with no region above it. Off-breast pixels stay 0; a map that
    is all 0 (no breast cell on the grid) or already at the score is left as it is."""
    window = (slice(placement.top, placement.bottom), slice(placement.left, placement.right)) \
        if placement is not None else (slice(None), slice(None))
    region = heatmap[window]
    top = float(region.max(initial=0.0))
    if top <= 0.0 or top >= probability or not 0.0 < probability < 1.0:
        return heatmap
    # sigmoid(logit(v) + s) = v k / (1 + v (k - 1)) with k = exp(s): no log or exp per pixel,
    # and 0 stays 0
    k = (probability / (1.0 - probability)) / (top / (1.0 - top))
    denominator = region * np.float32(k - 1.0)
    denominator += np.float32(1.0)
    region *= np.float32(k)
    region /= denominator
    return heatmap


def apply_contralateral(probabilities: torch.Tensor, heatmaps: torch.Tensor,
                        others: Sequence[int | None], spec: dict[str, Any]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A bundle trained to read a breast against the other one (`contralateral` in its
    metadata): each image's logit and each of its heatmap cells' logits lose `weight` x the
    image logit of the same view of the other breast (`others[i]`, an index into the batch), or
    `weight` x `missing_other_logit` when the study has no such view. Raw scale, before the
    calibration, which was fitted on scores adjusted the same way."""
    logits = _logit(probabilities)
    weight, missing = float(spec["weight"]), float(spec["missing_other_logit"])
    offsets = torch.tensor([weight * (float(logits[j]) if j is not None else missing)
                            for j in others], dtype=torch.float32)
    adjusted = torch.sigmoid(logits - offsets)
    shape = (-1,) + (1,) * (heatmaps.ndim - 1)
    return adjusted, torch.sigmoid(_logit(heatmaps) - offsets.view(shape))


def operating_point(metadata: dict[str, Any], name: str = DEFAULT_OPERATING_POINT) -> float:
    """The threshold of the bundle's operating point `name` (`model.operating_point` in the
    node's configuration); ModelError naming the points it declares when it has no such one."""
    points = metadata.get("operating_points")
    try:
        if not isinstance(points, dict):
            raise TypeError("operating_points is not an object")
        value = float(points[name])
    except (KeyError, TypeError, ValueError):
        declared = sorted(points) if isinstance(points, dict) else []
        raise ModelError(f"operating point {name!r} is not one the bundle declares "
                         f"(metadata.json operating_points: {', '.join(declared) or 'none'})"
                         ) from None
    if not 0.0 <= value <= 1.0:
        raise ModelError(f"operating point {name!r} is {value}, outside [0, 1]")
    return value


class ModelRunner:
    """A loaded bundle. Not thread-safe; one per worker process."""

    def __init__(self, bundle_dir: Path, metadata: dict[str, Any],
                 module: torch.nn.Module, device: torch.device,
                 operating_point_name: str = DEFAULT_OPERATING_POINT) -> None:
        self.bundle_dir = bundle_dir
        self.metadata = metadata
        self.module = module
        self.device = device
        self.calibration = Calibration.from_metadata(metadata)
        self.preprocess = build_preprocess(metadata)
        self.identity = ModelIdentity(
            name=str(metadata["name"]),
            version=str(metadata["version"]),
            operating_point=operating_point(metadata, operating_point_name),
            operating_point_name=operating_point_name,
            description=str(metadata.get("output", {}).get("score", "")),
        )
        self.last_timings_s: dict[str, float] = {}
        self._views_pool: ThreadPoolExecutor | None = None

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for the per-view work around the forward pass (preprocessing, heatmaps back
        to the source grid), as many as the CPUs the model may use."""
        if self._views_pool is None:
            self._views_pool = ThreadPoolExecutor(max_workers=cpu_threads(),
                                                  thread_name_prefix="mammo-views")
        return self._views_pool

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    probability, heatmap = self.module(batch.to(self.device, non_blocking=True))
            else:
                probability, heatmap = self.module(batch)
        return probability.float().cpu(), heatmap.float().cpu()

    def _forward_boxes(self, batch: torch.Tensor, placements: Sequence[Placement | None]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass, each image on its own `content_box` (images with the same box in
        one pass), heatmaps padded back to the canvas with 0 (off the box is off the breast)."""
        boxes = [content_box(self.metadata, p) for p in placements]
        if all(box == tuple(batch.shape[2:]) for box in boxes):
            return self._forward(batch)
        probabilities = torch.empty(len(boxes))
        heatmaps = torch.zeros(len(boxes), 1, *batch.shape[2:])
        for box in dict.fromkeys(boxes):
            index = torch.tensor([i for i, b in enumerate(boxes) if b == box])
            rows, cols = box
            probability, heatmap = self._forward(batch[index, :, :rows, :cols].contiguous())
            probabilities[index] = probability
            heatmaps[index, :, :rows, :cols] = heatmap
        return probabilities, heatmaps

    def predict(self, images: Sequence[np.ndarray],
                views: Sequence[str | None] | None = None,
                pixel_spacings: Sequence[float | None] | None = None,
                contralateral: Sequence[int | None] | None = None) -> list[ViewPrediction]:
        """One forward pass for all views of a study (`views`, "MLO"/"CC" per image, only
        matters to a bundle with `input.breast_mask`: no pectoral is looked for on a CC;
        `pixel_spacings`, mm per pixel or None per image, only to a bundle with
        `input.pixel_spacing_mm`, which resamples each breast to its fixed pixel size;
        `contralateral`, per image the index in `images` of the same view of the other breast
        or None, only to a bundle with a `contralateral` block, see `apply_contralateral`)."""
        if not images:
            return []
        started = time.perf_counter()
        placements: list[Placement | None] = []
        prepared: list[tuple[np.ndarray, np.ndarray | None]] = []
        tensors = []

        def prepare(index: int) -> tuple[torch.Tensor, Placement | None,
                                         tuple[np.ndarray, np.ndarray | None]]:
            view = views[index] if views else None
            if uses_canvas(self.metadata):
                spacing = pixel_spacings[index] if pixel_spacings else None
                tensor, placement, breast = canvas_input(images[index], self.metadata, view,
                                                         spacing)
                return tensor, placement, (images[index], breast)
            image, mask = prepare_image(np.asarray(images[index], dtype=np.float32),
                                        self.metadata, view)
            return self.preprocess(image), None, (image, mask)

        # the views' numpy and torch work releases the GIL: two or more at once on a multi-core
        # machine (1.5 x on 2 cores for 4 x 4096 x 3328), results in the views' order
        for tensor, placement, item in self._pool().map(prepare, range(len(images))):
            tensors.append(tensor)
            placements.append(placement)
            prepared.append(item)
        batch = torch.stack(tensors)
        preprocessed = time.perf_counter()
        probabilities, heatmaps = self._forward_boxes(batch, placements)
        if self.metadata.get(CONTRALATERAL_KEY) is not None:
            probabilities, heatmaps = apply_contralateral(
                probabilities, heatmaps, list(contralateral or [None] * len(images)),
                self.metadata[CONTRALATERAL_KEY])
        inferred = time.perf_counter()
        calibration = self.calibration

        peak_is_score = self.metadata.get("output", {}).get(HEATMAP_PEAK_KEY) == "score"

        def answer(index: int) -> ViewPrediction:
            image = images[index]
            probability = float(probabilities[index].clamp(0.0, 1.0))
            if calibration is not None:
                probability = calibration.score(probability)
            heatmap = mask_heatmap(heatmap_to_image_grid(
                heatmaps[index], int(np.shape(image)[0]), int(np.shape(image)[1]),
                calibration, placements[index]), prepared[index][1], in_place=True)
            if peak_is_score:
                heatmap = lift_peak_to_score(heatmap, probability, placements[index])
            return ViewPrediction(probability=probability, heatmap=heatmap)

        predictions = list(self._pool().map(answer, range(len(images))))
        self.last_timings_s = {
            "preprocess": preprocessed - started,
            "inference": inferred - preprocessed,
            "heatmap": time.perf_counter() - inferred,
        }
        return predictions


def load_bundle(bundle_dir: str | Path, device: str = "auto",
                operating_point_name: str = DEFAULT_OPERATING_POINT) -> ModelRunner:
    """Load and check a bundle, its verdicts at its operating point `operating_point_name`;
    ModelError names the file and what is wrong."""
    bundle_dir = Path(bundle_dir)
    metadata = read_metadata(bundle_dir)
    try:
        operating_point(metadata, operating_point_name)
    except ModelError as error:
        raise ModelError(f"{bundle_dir / METADATA_FILE}: {error}") from None
    check_bundle_files(bundle_dir)
    path = model_path(bundle_dir, metadata)
    torch_device = resolve_device(device)
    if torch_device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    if model_format(metadata) == "pt2":
        module = _load_exported(path, torch_device)
    else:
        log.warning("model_format_deprecated", model=str(metadata["name"]),
                    model_version=str(metadata["version"]), format="torchscript",
                    hint="re-export with tools/model/export.py (--to-pt2) for a model.pt2")
        module = _load_torchscript(path, torch_device)
    runner = ModelRunner(bundle_dir, metadata, module, torch_device, operating_point_name)
    _dry_run(runner, path)
    return runner


def _load_exported(path: Path, device: torch.device) -> torch.nn.Module:
    """The ExportedProgram saved by tools/model/export.py, as a module (exported in eval mode)."""
    try:
        program = torch.export.load(str(path))
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    except Exception as error:  # a bad or foreign file raises many kinds of errors
        raise ModelError(f"{path}: not a loadable torch.export program: {error}") from None


def _load_torchscript(path: Path, device: torch.device) -> torch.nn.Module:
    try:
        # torch.jit.load has no annotations; it returns the ScriptModule saved by tools/model/export.py.
        module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location=device).eval()
    except Exception as error:  # TorchScript raises RuntimeError and friends for a bad file
        raise ModelError(f"{path}: not a loadable TorchScript model: {error}") from None
    return module


def _dry_run(runner: ModelRunner, model_path: Path) -> None:
    """Feed one zero image of the declared size; the outputs must be what the metadata says.

    This catches a model file from another bundle (other input size or outputs) before the first
    study, instead of a shape error or a silently wrong heatmap in the middle of the night.
    """
    height, width = input_size(runner.metadata)
    try:
        probability, heatmap = runner._forward(torch.zeros(1, 1, height, width))
    except Exception as error:
        raise ModelError(f"{model_path}: dry run on a 1x1x{height}x{width} input failed: "
                         f"{error}") from None
    if tuple(probability.shape) != (1,) or heatmap.ndim != 4 or heatmap.shape[:2] != (1, 1):
        raise ModelError(f"{model_path}: outputs {tuple(probability.shape)} and "
                         f"{tuple(heatmap.shape)}, expected (B,) and (B, 1, h, w)")
    declared = runner.metadata["output"].get("heatmap_size")
    if declared is not None and list(heatmap.shape[2:]) != [int(v) for v in declared]:
        raise ModelError(f"{model_path}: heatmap {list(heatmap.shape[2:])} but metadata.json "
                         f"output.heatmap_size says {declared}")
    box = runner.metadata["input"].get("content_box")
    if box is not None:  # the network must take the smaller boxes the worker will feed it
        rows = max(int(box.get("min_px", box["multiple"])), height // 2 // int(box["multiple"])
                   * int(box["multiple"]))
        try:
            _, small = runner._forward(torch.zeros(1, 1, rows, width))
        except Exception as error:
            raise ModelError(f"{model_path}: input.content_box, but a 1x1x{rows}x{width} input "
                             f"failed: {error}") from None
        if tuple(small.shape[2:]) != (rows, width):
            raise ModelError(f"{model_path}: input.content_box, but a {rows}x{width} input gave "
                             f"a {tuple(small.shape[2:])} heatmap")
    for name, values in (("probability", probability), ("heatmap", heatmap)):
        if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
            raise ModelError(f"{model_path}: dry run {name} outside [0, 1]")

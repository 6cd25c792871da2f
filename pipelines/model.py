"""The model bundle: checked when loaded, run in batches, heatmaps mapped back to the source grid.

A bundle is a folder with `model.ts` (TorchScript) and `metadata.json`. Nothing is ever
downloaded and nothing falls back to random weights: a missing or mismatched bundle is a
ModelError, which stops the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from node.errors import ModelError
from pipelines.preprocess import build_preprocess, input_size
from pipelines.results import ModelIdentity

SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_KEYS = ("format_version", "name", "version", "input", "output", "operating_points",
                 "model_sha256")
DEFAULT_OPERATING_POINT = "balanced"
MAX_CPU_THREADS = 4


@dataclass(frozen=True)
class ViewPrediction:
    """The model's answer for one image, on that image's own pixel grid."""

    probability: float
    heatmap: np.ndarray  # float32 in [0, 1], exactly the shape of the image given to predict


def file_sha256(path: Path) -> str:
    """Streamed, so a large model file is never read whole just to be checked."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(bundle_dir: Path) -> dict[str, Any]:
    """metadata.json, checked for the keys and values the runner relies on."""
    if not bundle_dir.is_dir():
        raise ModelError(f"model bundle {bundle_dir}: folder not found")
    path = bundle_dir / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model bundle {bundle_dir}: metadata.json missing") from None
    except ValueError as error:
        raise ModelError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: must be a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelError(f"{path}: missing key(s) {', '.join(missing)}")
    if metadata["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelError(f"{path}: format_version {metadata['format_version']!r} not supported "
                         f"(supported: {SUPPORTED_FORMAT_VERSIONS})")
    try:
        height, width = input_size(metadata)
        intensity = metadata["input"]["intensity"]
        float(intensity["lower_percentile"]), float(intensity["upper_percentile"])
        float(metadata["operating_points"][DEFAULT_OPERATING_POINT])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{path}: input/operating_points incomplete ({error!r})") from None
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise ModelError(f"{path}: input size {height}x{width} out of range")
    if metadata["input"].get("orientation") != "chest_wall_left":
        raise ModelError(f"{path}: input.orientation must be 'chest_wall_left' "
                         f"(got {metadata['input'].get('orientation')!r})")
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


def heatmap_to_image_grid(heatmap: np.ndarray | torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """Resize a model-grid heatmap to the image's exact rows x cols.

    The preprocessing resized the whole image (no crop, no padding), so model cell (i, j)
    covers image rows [i, i+1) * rows / H and columns [j, j+1) * cols / W; bilinear resizing
    with align_corners=False keeps those cell centres where they belong.
    """
    tensor = torch.as_tensor(heatmap, dtype=torch.float32)
    while tensor.ndim < 4:
        tensor = tensor[None]
    resized = F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)


class ModelRunner:
    """A loaded bundle. Not thread-safe; one per worker process."""

    def __init__(self, bundle_dir: Path, metadata: dict[str, Any],
                 module: torch.jit.ScriptModule, device: torch.device) -> None:
        self.bundle_dir = bundle_dir
        self.metadata = metadata
        self.module = module
        self.device = device
        self.preprocess = build_preprocess(metadata)
        points = metadata["operating_points"]
        self.identity = ModelIdentity(
            name=str(metadata["name"]),
            version=str(metadata["version"]),
            operating_point=float(points[DEFAULT_OPERATING_POINT]),
            operating_point_name=DEFAULT_OPERATING_POINT,
            description=str(metadata.get("output", {}).get("score", "")),
        )
        self.last_timings_s: dict[str, float] = {}

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    probability, heatmap = self.module(batch.to(self.device, non_blocking=True))
            else:
                probability, heatmap = self.module(batch)
        return probability.float().cpu(), heatmap.float().cpu()

    def predict(self, images: Sequence[np.ndarray]) -> list[ViewPrediction]:
        """One forward pass for all views of a study."""
        if not images:
            return []
        started = time.perf_counter()
        batch = torch.stack([self.preprocess(image) for image in images])
        preprocessed = time.perf_counter()
        probabilities, heatmaps = self._forward(batch)
        inferred = time.perf_counter()
        predictions = [
            ViewPrediction(
                probability=float(probabilities[index].clamp(0.0, 1.0)),
                heatmap=heatmap_to_image_grid(heatmaps[index], *np.shape(image)),
            )
            for index, image in enumerate(images)
        ]
        self.last_timings_s = {
            "preprocess": preprocessed - started,
            "inference": inferred - preprocessed,
            "heatmap": time.perf_counter() - inferred,
        }
        return predictions


def load_bundle(bundle_dir: str | Path, device: str = "auto") -> ModelRunner:
    """Load and check a bundle; ModelError names the file and what is wrong."""
    bundle_dir = Path(bundle_dir)
    metadata = read_metadata(bundle_dir)
    model_path = bundle_dir / "model.ts"
    if not model_path.is_file():
        raise ModelError(f"model bundle {bundle_dir}: model.ts missing")
    actual = file_sha256(model_path)
    if actual != metadata["model_sha256"]:
        raise ModelError(f"{model_path}: sha256 {actual[:12]}… does not match metadata.json "
                         f"({str(metadata['model_sha256'])[:12]}…)")
    torch_device = resolve_device(device)
    if torch_device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    try:
        # torch.jit.load has no annotations; it returns the ScriptModule saved by tools/model/export.py.
        module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            str(model_path), map_location=torch_device).eval()
    except Exception as error:  # TorchScript raises RuntimeError and friends for a bad file
        raise ModelError(f"{model_path}: not a loadable TorchScript model: {error}") from None
    runner = ModelRunner(bundle_dir, metadata, module, torch_device)
    _dry_run(runner, model_path)
    return runner


def _dry_run(runner: ModelRunner, model_path: Path) -> None:
    """Feed one zero image of the declared size; the outputs must be what the metadata says.

    This catches a model.ts from another bundle (other input size or outputs) before the first
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
    for name, values in (("probability", probability), ("heatmap", heatmap)):
        if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
            raise ModelError(f"{model_path}: dry run {name} outside [0, 1]")

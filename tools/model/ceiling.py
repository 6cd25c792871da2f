"""Does a digital exam score high because its cell features lie outside the range the films'
span? A diagnostic of a feature ceiling (R1, activation clipping) on a shipped bundle.

    python -m tools.model.ceiling --bundle models/mias-baseline --mias ../shared/data/mias \
        --exam ../shared/data/ffdm-exam --pixel-spacing 0.11 --out build/ceiling

The bundle's heads are linear on each cell's trunk features, so a cell whose features lie far
outside what the training films showed (an image unlike them) can reach a logit no film could.
R1 measures, per channel of each head's feature level, the films' range over their breast cells
(the `--tail` and 1 - `--tail` quantiles of up to 256 sampled cells per film, no labels used),
then reads the same network with every cell's features clipped to it
(`tools.model.cells.FeatureBounds`; ReAct, Sun et al. 2021, clips activations so for
out-of-distribution inputs):
- the digital exam of `tools.model.domain` (the same variants of storage and acquisition), with
  how far outside the films' range each view's cells lie (the mean fraction of a breast cell's
  channels outside it) beside the films' own;
- the MIAS films (every woman, both breasts read together, as the worker reads a study): their
  scores' rank correlation, how far they move, the AUC and the lesion hits. The films are the
  network's training data (in-sample): this says how much the ceiling changes what the network
  sees on its own domain, not how good either reading is.

Rule, written before the first run (H1's): a ceiling at the films' 1st and 99th percentiles
(`--tail 0.01`) is worth a retrained bundle if (a) on the digital exam as given no view rises
above the balanced point and L-CC or R-MLO falls below it, and (b) on the films the two readings
keep their order (Spearman >= 0.95) and the in-sample AUC and lesion hits move by at most 0.02
and 3. `--tail 0.05` is read beside it, for the trend only.

The readings are written to `--out/ceiling.json`."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tools.model.cells import CellHeadModel, FeatureBounds, level_stride

CELLS_PER_FILM = 256
SEED = 20261203


def scripted_model(bundle: Path, metadata: dict[str, Any]) -> CellHeadModel:
    """The bundle's network as a `CellHeadModel` (so bounds can be set on it), from its
    TorchScript file's trunk and heads and its metadata's recipe."""
    scripted = torch.jit.load(str(bundle / "model.ts"), map_location="cpu")
    config = metadata["training"]["arch_config"]
    heat = config.get("heat_head") or {}
    net = CellHeadModel.__new__(CellHeadModel)
    nn.Module.__init__(net)
    net.trunk = scripted.trunk
    net.head = scripted.head
    net.heat_head = scripted.heat_head
    net.level, net.stride = config["level"], level_stride(config["level"])
    net.heat_level = str(heat.get("level", config["level"]))
    net.heat_stride = level_stride(net.heat_level)
    net.pooling, net.peak = config["pooling"], str(heat.get("mode", "raw"))
    net.heat_scale = float(heat.get("scale", 1.0))
    net.bounds = {}
    net.eval()
    return net


class Recorder:
    """Samples the breast cells' features entering each level's bounds during a reading."""

    def __init__(self, net: CellHeadModel, limit: int = CELLS_PER_FILM) -> None:
        self.limit = limit
        self.samples: dict[str, list[np.ndarray]] = {}
        self.inside: dict[int, torch.Tensor] = {}
        self.generator = np.random.default_rng(SEED)
        self.handles = [net.register_forward_pre_hook(self._input)]
        for level in {net.level, net.heat_level}:
            bounds = FeatureBounds(torch.full((1,), -torch.inf), torch.full((1,), torch.inf))
            net.bounds[level] = bounds
            self.handles.append(bounds.register_forward_hook(self._hook(level)))

    def _input(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        self.inside = {stride: F.avg_pool2d((x > 0).float(), stride)[:, 0] >= 0.5
                       for stride in (16, 32)}

    def _hook(self, level: str) -> Any:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            maps = args[0]
            inside = self.inside[level_stride(level)]
            for image in range(maps.shape[0]):
                cells = maps[image].permute(1, 2, 0)[inside[image]].numpy()
                if len(cells) > self.limit:
                    cells = cells[self.generator.choice(len(cells), self.limit, replace=False)]
                self.samples.setdefault(level, []).append(cells)
        return record

    def close(self) -> dict[str, list[np.ndarray]]:
        """Per level, each image's sampled cells (cells x channels), in reading order."""
        for handle in self.handles:
            handle.remove()
        return self.samples


def bounded(runner: Any, bundle: Path, cells: dict[str, np.ndarray], tail: float) -> Any:
    """A copy of `runner` reading the bundle's network rebuilt, with every level's features
    clipped to the films' `tail` and 1 - `tail` quantiles (tail 0: no bounds)."""
    other = copy.copy(runner)
    clipped = scripted_model(bundle, runner.metadata)
    if tail > 0:
        for level, values in cells.items():
            low, high = np.quantile(values, [tail, 1.0 - tail], axis=0)
            clipped.bounds[level] = FeatureBounds(torch.from_numpy(low), torch.from_numpy(high))
    other.module = clipped
    return other


def outside_fraction(runner: Any, images: list[np.ndarray], spacing: float,
                     cells: dict[str, np.ndarray], level: str, tail: float) -> list[float]:
    """Per image, the mean over its breast cells of the fraction of `level`'s channels outside
    the films' `tail` .. 1 - `tail` range."""
    from tools.model.domain import predict_exam

    low, high = np.quantile(cells[level], [tail, 1.0 - tail], axis=0)
    recorder = Recorder(runner.module, limit=10**9)
    try:
        predict_exam(runner, images, spacing)
    finally:
        sampled = recorder.close()[level]
        runner.module.bounds = {}
    return [round(float(((s < low) | (s > high)).mean()), 4) for s in sampled]


def main(argv: list[str] | None = None) -> int:
    from node.shadow_report import spearman
    from pipelines.model import load_bundle
    from pipelines.results import SCREENING_VIEWS
    from tools.model.domain import load_exam, peaks, score_exam, variants
    from tools.model.harmonise import print_readings, read_films

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--mias", required=True)
    parser.add_argument("--exam", required=True, type=Path)
    parser.add_argument("--pixel-spacing", type=float, required=True,
                        help="mm per pixel of the exam's PNGs (they carry none)")
    parser.add_argument("--tail", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    runner = load_bundle(args.bundle, "cpu")
    point = float(runner.metadata["operating_points"]["balanced"])
    plain = bounded(runner, args.bundle, {}, 0.0)
    model_spacing = float(runner.metadata["input"]["pixel_spacing_mm"])
    images = load_exam(args.exam)
    # the rebuilt network must read as the shipped one (the exported .pt2 the worker loads)
    drift = max(abs(a - b) for a, b in zip(
        score_exam(runner, images, args.pixel_spacing).values(),
        score_exam(plain, images, args.pixel_spacing).values(), strict=True))
    print(f"rebuilt network against the shipped one: largest exam score difference "
          f"{drift:.2e}", file=sys.stderr)
    recorder = Recorder(plain.module)
    films = {"as shipped": read_films(plain, args.mias)}
    cells = {level: np.concatenate(sampled) for level, sampled in recorder.close().items()}
    plain.module.bounds = {}
    readings = {"as shipped": plain}
    for tail in args.tail:
        readings[f"ceiling {tail:g}"] = bounded(runner, args.bundle, cells, tail)
        films[f"ceiling {tail:g}"] = read_films(readings[f"ceiling {tail:g}"], args.mias)
    exam = []
    for name, pixels, spacing in variants(images, args.pixel_spacing, model_spacing):
        for reading, model in readings.items():
            scores = score_exam(model, pixels, spacing)
            exam.append({"variant": name, "reading": reading, "pixel_spacing_mm": spacing,
                         **scores, "above_balanced": [k for k, v in scores.items() if v >= point]})
    located = {reading: peaks(model, images, args.pixel_spacing, point)
               for reading, model in readings.items()}
    before = np.asarray(films["as shipped"]["scores"])
    change = {}
    for reading in readings:
        if reading == "as shipped":
            continue
        after = np.asarray(films[reading]["scores"])
        moved = np.abs(after - before)
        rho = spearman(before.tolist(), after.tolist())
        change[reading] = {
            "spearman": None if rho is None else round(rho, 4),
            "median_abs_change": round(float(np.median(moved)), 4),
            "p90_abs_change": round(float(np.percentile(moved, 90)), 4),
            "crossed_balanced": int(((after >= point) != (before >= point)).sum())}
    level = plain.module.level
    outside = {}
    for tail in args.tail:
        exam_out = outside_fraction(plain, images, args.pixel_spacing, cells, level, tail)
        low, high = np.quantile(cells[level], [tail, 1.0 - tail], axis=0)
        per_cell = ((cells[level] < low) | (cells[level] > high)).mean(1)
        outside[f"{tail:g}"] = {
            "exam": dict(zip(SCREENING_VIEWS, exam_out, strict=True)),
            "films_cells_mean": round(float(per_cell.mean()), 4),
            "films_cells_p99": round(float(np.percentile(per_cell, 99)), 4)}
    result = {"bundle": runner.metadata.get("version"), "operating_point": point,
              "rebuilt_max_score_difference": drift, "cells_sampled": {
                  k: int(v.shape[0]) for k, v in cells.items()},
              "exam": exam, "peaks": located, "outside_range": outside,
              "films": {k: {kk: vv for kk, vv in v.items() if kk not in ("ids", "scores")}
                        for k, v in films.items()},
              "films_change": change}
    (args.out / "ceiling.json").write_text(json.dumps(result, indent=1) + "\n")
    print_readings(exam, point)
    print(json.dumps({k: result[k] for k in ("peaks", "outside_range", "films", "films_change",
                                             "rebuilt_max_score_difference")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

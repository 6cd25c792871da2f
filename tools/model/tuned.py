"""A bundle on a fine-tuned trunk: the base bundle's recipe (score head and heat head) fitted on
the features of the trunk that `topfit --train all --final` trained on every film, with its
metrics, calibration and operating points from `topfit --train all --recipes inner`'s outer
folds (each outer fold's heads are the recipe its inner CV chose in the base bundle's nested
run; the trunk's schedule is fixed, so nothing is chosen on a test fold).

    python -m tools.model.topfit --features build/cells/lite0 --out build/cells/e1-r0 \\
        --bundle build/cells/bundle-0.5.0 --train all --recipes inner --mias ../shared/data/mias
    python -m tools.model.topfit --features build/cells/lite0 --out build/cells/e1-final \\
        --bundle build/cells/bundle-0.5.0 --train all --final --mias ../shared/data/mias
    python -m tools.model.cells extract --mias ../shared/data/mias --out build/cells/e1 \\
        --trunk build/cells/e1-final/trunk.pt
    python -m tools.model.tuned --features build/cells/e1 --trunk build/cells/e1-final \\
        --outer build/cells/e1-r0/topfit.json --base build/cells/bundle-0.5.0 \\
        --mias ../shared/data/mias --out build/bundle --version 0.6.1

The outer runs' `tuned shipped` arm is what the bundle is: the same trunk schedule trained on
each outer training part, with the heads of that fold's recipe refitted on its maps (the arm's
name is topfit's; with `topfit --recipes inner`, as `make train` runs it, a fold's recipe is
the one its inner CV chose, not the shipped one). The first `--outer` run (repeat 0)
gives the card's metrics and predictions.jsonl; more runs (other repeats) give the spread.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.model.cells import (
    CONTRA_WEIGHT,
    CONTRALATERAL_KEY,
    SEED,
    CellHeadModel,
    Features,
    LiteTrunk,
    cells_detector,
    extract_command,
    film_index,
    finish_bundle,
    fit_cells,
    fit_head,
    head_spec,
    heat_scale_of,
    level_maps,
    pool_scores,
    save_network,
    stored_point,
)
from tools.model.dataset import grouped_folds, mias_records
from tools.model.topfit import TRUNK_FILE, shipped_recipe

ARM = "tuned shipped"  # topfit's arm: the trained trunk with the fold's recipe's heads refitted


def _json(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def check_inputs(feature_info: dict[str, Any], trunk_run: dict[str, Any], trunk_sha: str,
                 outer: list[dict[str, Any]], ids: list[str]) -> None:
    """SystemExit unless the features were extracted through this trunk, the trunk file is the
    one its run wrote, and every outer run trained the same schedule on the same films, the first
    with the inner folds' recipes."""
    if trunk_run["sha256"] != trunk_sha:
        raise SystemExit(f"{TRUNK_FILE} is not the file its trunk.json describes")
    if (feature_info.get("trunk") or {}).get("sha256") != trunk_sha:
        raise SystemExit("the features were not extracted through this trunk "
                         "(cells extract --trunk)")
    if feature_info.get("vflip"):
        raise SystemExit("the features hold mirrors; the bundle's heads are fitted on films only")
    if trunk_run["ids"] != ids:
        raise SystemExit("the trunk was trained on other films")
    if [run["repeat"] for run in outer] != list(range(len(outer))):
        raise SystemExit("give the outer runs as repeats 0, 1, ... in order")
    for run in outer:
        if run["ids"] != ids:
            raise SystemExit(f"outer run (repeat {run['repeat']}) was run on other films")
        if run["schedule"] != trunk_run["schedule"]:
            raise SystemExit(f"outer run (repeat {run['repeat']}) trained another schedule: "
                             f"{run['schedule']} vs {trunk_run['schedule']}")
    if outer[0].get("recipes") != "inner":
        raise SystemExit("the first outer run must fit the inner folds' recipes (--recipes inner)")


def prediction_rows(run: dict[str, Any], records: list[Any], mias: Path) -> list[dict[str, Any]]:
    """predictions.jsonl of the outer run's `ARM`: each film's outer-fold score (sigmoid of the
    pooled logit), fold, heatmap peak (stored film pixels) and lesion hit."""
    folds = grouped_folds(records, run["folds"], run["seed"])
    fold_of = {int(i): f for f, idx in enumerate(folds) for i in idx}
    stored = {r.id: r for r in mias_records(mias)}
    rows = []
    for film, record in enumerate(records):
        rows.append({
            "id": record.id, "group": record.group, "label": int(record.label),
            "malignant": int(record.malignant or 0), "fold": fold_of[film],
            "score": round(float(1 / (1 + np.exp(-run["oof"][ARM][film]))), 6),
            "hit": run["hit"][ARM][film],
            "peak_xy": stored_point(tuple(run["peak_canvas_xy"][ARM][film]),
                                    run["placement"][film], stored[record.id])})
    return rows


def tuned_metrics(base: dict[str, Any], outer: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's metrics from the outer runs' `ARM` (the first run's pooled predictions; the
    others' AUCs and hits give the spread)."""
    first = outer[0]["summary"][ARM]
    hits = first["hits"]
    hit_all = [sum(run["summary"][ARM]["hits"][k] for run in outer) for k in (0, 1)]
    seeds = [run["seed"] for run in outer]
    kinds = ", ".join(f"repeat {run['repeat']}: {run['recipes']}" for run in outer)
    return {
        "split": f"{len(outer)} repeat(s) of {outer[0]['folds']} outer folds grouped by woman "
                 "(left/right pair) and stratified (malignant / benign only / normal women), "
                 f"seeds {seeds}, the base bundle's nested-CV outer folds; inside each outer "
                 "training part the trunk was fine-tuned end to end with a schedule fixed "
                 "before any run (nothing chosen), then the heads were fitted on its maps: "
                 "those of the recipe that fold's inner CV chose on the frozen ImageNet "
                 "features in the base bundle's nested run ('inner'), or the shipped recipe "
                 f"('shipped', chosen by a CV over all films: slightly optimistic) ({kinds}); "
                 "each outer test fold scored once. Reported: repeat "
                 f"{outer[0]['repeat']}'s pooled outer-fold predictions; the repeats' AUCs "
                 "give the spread",
        "normal_vs_abnormal_auc": first["auc"],
        "normal_vs_abnormal_auc_ci95": first["auc_ci95"],
        "malignant_vs_rest_auc": first["malignant_auc"],
        "malignant_vs_rest_auc_ci95": first["malignant_auc_ci95"],
        "fold_aucs": [fold[ARM]["auc"] for fold in outer[0]["per_fold"]],
        "repeat_aucs": [run["summary"][ARM]["auc"] for run in outer],
        "repeat_malignant_aucs": [run["summary"][ARM].get("malignant_auc") for run in outer],
        "lesion_hit_rate": round(hits[0] / max(1, hits[1]), 4),
        "lesion_hits": hits,
        "lesion_hits_all_repeats": hit_all,
        "repeat_lesion_hits": [run["summary"][ARM]["hits"] for run in outer],
        "ci_method": base["metrics"]["ci_method"],
        # each repeat's recipe per outer fold, and whose choice it was ("inner": the base
        # bundle's nested run, on the frozen features named here; "shipped": its final recipe)
        "recipes_chosen": [[fold["recipe"] for fold in run["per_fold"]] for run in outer],
        "recipes_kind": [run["recipes"] for run in outer],
        "recipes_features": Path(outer[0]["features"]).name,
        "frozen_trunk_same_folds": {
            "repeat_aucs": [run["summary"]["frozen shipped"]["auc"] for run in outer],
            "repeat_lesion_hits": [run["summary"]["frozen shipped"]["hits"] for run in outer],
            "auc_ci95_first": outer[0]["summary"]["frozen shipped"]["auc_ci95"]},
        "base_bundle": {"name": base["name"], "version": base["version"],
                        "normal_vs_abnormal_auc": base["metrics"]["normal_vs_abnormal_auc"],
                        "repeat_aucs": base["metrics"]["repeat_aucs"],
                        "lesion_hits_all_repeats": base["metrics"]["lesion_hits_all_repeats"]},
    }


def tuned_training(base: dict[str, Any], trunk_run: dict[str, Any], args: argparse.Namespace,
                   feature_info: dict[str, Any], wall: float) -> dict[str, Any]:
    """The base bundle's `training`, with the trunk's fine-tuning and this build's commands."""
    training: dict[str, Any] = copy.deepcopy(base["training"])
    schedule = trunk_run["schedule"]
    arch = trunk_run["arch"]
    config = training["arch_config"]
    config.update({"frozen": False, "trunk": {"sha256": trunk_run["sha256"],
                                              "schedule": schedule, "seed": trunk_run["seed"],
                                              "train_loss": trunk_run["train_loss"]}})
    training["arch"] = f"{arch}-finetuned+cell-logistic"
    training["architecture"] = training["architecture"].replace(
        "(ImageNet weights, frozen, stem to last block)",
        "(ImageNet weights, then the whole trunk, stem to last block, fine-tuned end to end on "
        "the films: `topfit --train all --final`)")
    training["augmentation"] = (
        f"trunk fine-tuning: each step's film mirrored top to bottom with probability "
        f"{schedule['mirror_p']} (cells and labels with it) and its breast intensities raised "
        f"to a gamma exp(U(-{schedule['gamma_log_range']}, {schedule['gamma_log_range']})); "
        "the heads: none (fitted on the fine-tuned trunk's maps of the films)")
    training["supervision"] += (
        f"; trunk fine-tuning (before the heads): a per-cell head on level "
        f"{schedule['head_level']} (started from the logistic head on the frozen maps, L2 "
        f"{schedule['head_start_l2']:g}) trained with the trunk: the class-balanced cell loss "
        f"plus {schedule['image_loss_weight']:g} x a class-balanced logistic loss of the image "
        "logit (mean of the 3 highest breast cells) against the film's label; that head is "
        "dropped and the bundle's heads fitted on the trained trunk's maps")
    training["schedule"] = (
        f"trunk: AdamW, {schedule['epochs']} epochs of one film per step, trunk lr "
        f"{schedule['trunk_lr']:g} (weight decay {schedule['weight_decay']:g}, none on "
        f"batch-norm scales and shifts and biases), head lr {schedule['head_lr']:g}, batch "
        "norms frozen at their ImageNet statistics, fixed before any run; heads: "
        + base["training"]["schedule"] + f" (the base bundle {base['name']} "
        f"{base['version']}'s recipe, refitted on the fine-tuned trunk's maps)")
    feats = args.features
    outer_cmds = [f"python -m tools.model.topfit --features {run_features} --out "
                  f"{Path(path).parent} --bundle {args.base} --train all --recipes {kind} "
                  f"--repeat {repeat} --mias ../shared/data/mias --threads 2"
                  for path, run_features, kind, repeat in args.outer_runs]
    frozen = trunk_run["features"]
    training["command"] = " && ".join(
        [base["training"]["command"], base["training"]["export_command"], *outer_cmds,
         f"python -m tools.model.topfit --features {frozen} --out {args.trunk} --bundle "
         f"{args.base} --train all --final --mias ../shared/data/mias --threads 2",
         extract_command(feats, feature_info) + f" --trunk {Path(args.trunk) / TRUNK_FILE}"])
    training["export_command"] = "python -m tools.model.tuned " + " ".join(
        sys.argv[1:] if args.argv is None else args.argv)
    training["torch"] = torch.__version__
    training["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    training["wall_time_s"] = round(wall, 1)
    training.pop("inference", None)
    return training


def build(args: argparse.Namespace) -> int:
    from node.bundle import LEGACY_SHA_KEY, PT2_FILE, file_sha256
    from node.drift import REFERENCE_KEY
    from pipelines.calibration import CALIBRATION_KEY

    torch.set_num_threads(args.threads)
    started = time.time()
    trunk_dir = Path(args.trunk)
    trunk_run = _json(trunk_dir / "trunk.json")
    trunk_sha = file_sha256(trunk_dir / TRUNK_FILE)
    feature_info = _json(Path(args.features) / "info.json")
    outer = [_json(Path(path)) for path in args.outer]
    args.outer_runs = [(path, run["features"], run["recipes"], run["repeat"])
                       for path, run in zip(args.outer, outer, strict=True)]
    base = _json(Path(args.base) / "metadata.json")
    feats = Features.load(Path(args.features))
    records, _ = film_index(feats.info)
    ids = [r.id for r in records]
    check_inputs(feature_info, trunk_run, trunk_sha, outer, ids)
    if int(feature_info.get("pectoral_detector", 1)) != int(
            base["input"].get("pectoral_detector", 1)):
        raise SystemExit(f"{args.features} was extracted with another pectoral detector than "
                         f"the base bundle declares")
    if cells_detector(feature_info) != cells_detector(base["input"]):
        raise SystemExit(f"{args.features} takes its breast cells from another detector than "
                         f"the base bundle declares (--cell-mask-detector)")
    recipe = shipped_recipe(base)
    films = np.arange(len(records))
    maps, mask, label = level_maps(feats, recipe["level"])
    model = fit_cells(maps, mask, label, films, feats.info, recipe["l2"], SEED)
    heat = recipe["heat"]
    heat_spec, heat_scale = None, 1.0
    if (heat["level"], heat["l2"], heat["loss"]) != (recipe["level"], recipe["l2"], "bce"):
        hmaps, hmask, hlabel = level_maps(feats, heat["level"])
        heat_model = fit_head(hmaps, hmask, hlabel, films, feats.info, heat["l2"],
                              heat["loss"], SEED)
        heat_spec = head_spec(heat_model, heat["level"])
        heat_scale = heat_scale_of(model.logits(maps), mask, heat_model.logits(hmaps), hmask)
    net = CellHeadModel(LiteTrunk(trunk_run["arch"], trunk_dir / TRUNK_FILE).for_inference(),
                        head_spec(model, recipe["level"]), recipe["pooling"], heat["mode"],
                        heat_spec, heat_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    legacy = save_network(out, net)
    rows = prediction_rows(outer[0], records, Path(args.mias))
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    metadata = {k: copy.deepcopy(v) for k, v in base.items()
                if k not in (CALIBRATION_KEY, REFERENCE_KEY, "operating_points_detail",
                             LEGACY_SHA_KEY)}
    metadata["version"] = args.version
    metadata["model_sha256"] = file_sha256(out / PT2_FILE)
    metadata[LEGACY_SHA_KEY] = legacy
    metadata["output"]["heatmap"] = metadata["output"]["heatmap"].replace(
        "on frozen ImageNet features", "on the fine-tuned trunk's features")
    metadata["output"]["heatmap"] = metadata["output"]["heatmap"].replace(
        f"logits x {base['training']['arch_config']['heat_head']['scale']:.3f}",
        f"logits x {heat_scale:.3f}")
    metadata["metrics"] = tuned_metrics(base, outer)
    wall = (time.time() - started + float(trunk_run["wall_s"]) + float(feature_info["wall_s"])
            + sum(float(run["wall_s"]) for run in outer))
    metadata["training"] = tuned_training(base, trunk_run, args, feature_info, wall)
    metadata["training"]["arch_config"]["heat_head"]["scale"] = round(heat_scale, 4)
    if recipe["contra"] == "diff":
        own = pool_scores(model.logits(maps), mask, recipe["pooling"])
        metadata[CONTRALATERAL_KEY]["weight"] = CONTRA_WEIGHT
        metadata[CONTRALATERAL_KEY]["missing_other_logit"] = round(float(np.mean(own)), 6)
    finish_bundle(out, metadata, rows, args.notes, args.threads,
                  mias_records(Path(args.mias)))
    summary = metadata["metrics"]
    print(f"bundle written to {out} ({time.time() - started:.0f}s): AUC "
          f"{summary['normal_vs_abnormal_auc']} {summary['normal_vs_abnormal_auc_ci95']}, hits "
          f"{summary['lesion_hits']}, heat scale {heat_scale:.3f}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True,
                        help="`cells extract --trunk` of the trained trunk (no mirrors)")
    parser.add_argument("--trunk", required=True,
                        help=f"`topfit --final`'s folder ({TRUNK_FILE}, trunk.json)")
    parser.add_argument("--outer", required=True, nargs="+",
                        help="topfit.json of `topfit --train all` runs, the first with "
                             "--recipes inner")
    parser.add_argument("--base", required=True,
                        help="the frozen-trunk bundle (`cells final`) whose recipe, domain and "
                             "nested folds this one takes")
    parser.add_argument("--mias", required=True, help="the films (their orientation, for peak_xy)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--notes", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.argv = argv
    return build(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""tools/model/topfit.py: the trunk's stride-32 stage fine-tuned with a cell head, on a small
synthetic feature cache written as `cells extract` writes one (the real run needs mini-MIAS)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tools.model import topfit
from tools.model.cells import Features, LiteTrunk, fit_cells, level_maps
from tools.model.metrics import auc

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"
GRID16 = (12, 8)  # stride-16 cells of the canvas
WOMEN = 6


def _write_cache(folder: Path) -> Path:
    """Two breasts per woman, content boxes of different sizes, lesion cells with their own
    feature direction on the abnormal films; stride-32 maps from the real (frozen) stage."""
    rng = np.random.default_rng(5)
    stage = LiteTrunk("efficientnet-lite0").blocks32
    direction = rng.normal(size=(112, 1, 1)).astype(np.float32)
    f16s, f32s, m16s, m32s, l16s, l32s, info = [], [], [], [], [], [], []
    for n in range(2 * WOMEN):
        h, w = (12, 8) if n % 3 else (8, 6)  # content box in stride-16 cells (even)
        abnormal = n % 4 == 1
        f16 = np.zeros((112, *GRID16), np.float32)
        f16[:, :h, :w] = rng.normal(scale=0.5, size=(112, h, w))
        label16 = np.zeros(GRID16, np.int8)
        lesions = []
        if abnormal:
            r, c = 2 + n % 3, 2
            label16[r:r + 2, c:c + 2] = 1
            f16[:, r:r + 2, c:c + 2] += 2.0 * direction
            lesions = [[(c + 1) * 16.0, (r + 1) * 16.0, 16.0]]
        f32 = np.zeros((320, GRID16[0] // 2, GRID16[1] // 2), np.float32)
        with torch.inference_mode():
            f32[:, :h // 2, :w // 2] = stage(torch.from_numpy(f16[None, :, :h, :w]))[0].numpy()
        mask16 = np.zeros(GRID16, bool)
        mask16[:h, :w] = True
        f16s.append(f16.astype(np.float16))
        f32s.append(f32.astype(np.float16))
        m16s.append(mask16)
        m32s.append(mask16[::2, ::2].copy())
        l16s.append(label16)
        l32s.append(label16[::2, ::2].copy())
        info.append({"id": f"film{n}", "group": f"w{n // 2}", "label": int(abnormal),
                     "malignant": 0, "laterality": "LR"[n % 2], "flip": 0,
                     "has_lesions": bool(lesions), "lesions": lesions,
                     "placement": [0, h * 16, 0, w * 16, h * 16, w * 16]})
    folder.mkdir()
    np.savez(folder / "features.npz", f16=np.stack(f16s), f32=np.stack(f32s), m16=np.stack(m16s),
             m32=np.stack(m32s), l16=np.stack(l16s), l32=np.stack(l32s))
    (folder / "info.json").write_text(json.dumps({"arch": "efficientnet-lite0", "vflip": False,
                                                  "images": info}))
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_cache(tmp_path_factory.mktemp("topfit") / "lite0")


def test_the_frozen_stage_on_each_content_box_reproduces_the_cache(cache: Path) -> None:
    feats = Features.load(cache)
    boxes = topfit.content_boxes(feats.level["32"])
    assert boxes[0] == (8, 6) and boxes[1] == (12, 8)
    maps, mask, label = level_maps(feats, topfit.HEAD_LEVEL)
    films = np.arange(len(feats.info))
    head = fit_cells(maps, mask, label, films, feats.info, topfit.HEAD_L2, 0)
    again, logits = topfit.recomputed(topfit.TopStage(LiteTrunk("efficientnet-lite0"), head),
                                      feats, boxes)
    np.testing.assert_allclose(again.level["32"].astype(np.float32),
                               feats.level["32"].astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(logits[mask], head.logits(maps)[mask], atol=2e-2)


def test_training_moves_the_stage_and_separates_the_lesion_cells(cache: Path) -> None:
    feats = Features.load(cache)
    boxes = topfit.content_boxes(feats.level["32"])
    films = np.arange(len(feats.info))
    maps, mask, label = level_maps(feats, topfit.HEAD_LEVEL)
    head = fit_cells(maps, mask, label, films, feats.info, 1.0, 0)  # a weak start
    model = topfit.TopStage(LiteTrunk("efficientnet-lite0"), head)
    before = [p.detach().clone() for p in model.stage.parameters()]
    _, start = topfit.recomputed(model, feats, boxes)
    losses = topfit.train_stage(model, feats, boxes, films, seed=0, epochs=3)
    _, tuned = topfit.recomputed(model, feats, boxes)
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.stage.parameters(), strict=True))

    def margin(logits: np.ndarray) -> float:
        return float(logits[label == 1].mean() - logits[(label == 0) & mask].mean())

    assert margin(tuned) > margin(start)


def test_norms_training_moves_the_batch_norms_only(cache: Path) -> None:
    feats = Features.load(cache)
    boxes = topfit.content_boxes(feats.level["32"])
    films = np.arange(len(feats.info))
    maps, mask, label = level_maps(feats, topfit.HEAD_LEVEL)
    model = topfit.TopStage(LiteTrunk("efficientnet-lite0"),
                            fit_cells(maps, mask, label, films, feats.info, 1.0, 0))
    norms = {id(p) for m in model.stage.modules() if isinstance(m, torch.nn.BatchNorm2d)
             for p in m.parameters()}
    before = {name: p.detach().clone() for name, p in model.stage.named_parameters()}
    topfit.train_stage(model, feats, boxes, films, seed=0, epochs=1, train="norms")
    moved = {name for name, p in model.stage.named_parameters()
             if not torch.equal(before[name], p)}
    named = dict(model.stage.named_parameters())
    assert moved and all(id(named[name]) in norms for name in moved)
    assert 100 * sum(p.numel() for p in named.values() if id(p) in norms) < 2 * sum(
        p.numel() for p in named.values())  # about 1 % of the stage
    with pytest.raises(ValueError, match="train"):
        topfit.stage_parameters(model, "everything")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_diagnostic_reports_each_arm_per_fold(cache: Path, tmp_path: Path) -> None:
    assert topfit.main(["--features", str(cache), "--out", str(tmp_path / "out"),
                        "--bundle", str(BUNDLE), "--folds", "2", "--epochs", "1",
                        "--threads", "1"]) == 0
    report = json.loads((tmp_path / "out" / "topfit.json").read_text())
    arms = {"frozen shipped", "tuned shipped", "frozen own", "tuned own"}
    assert set(report["summary"]) == arms
    assert report["recipe"]["level"] == json.loads((BUNDLE / "metadata.json").read_text())[
        "training"]["arch_config"]["level"]
    abnormal_with_circle = sum(1 for n in range(2 * WOMEN) if n % 4 == 1)
    for arm in arms:
        assert 0.0 <= report["summary"][arm]["auc"] <= 1.0
        hit, total = report["summary"][arm]["hits"]
        assert total == abnormal_with_circle and 0 <= hit <= total
    assert len(report["per_fold"]) == 2
    assert all(len(fold["train_loss"]) == 1 for fold in report["per_fold"])
    labels = [int(n % 4 == 1) for n in range(2 * WOMEN)]
    assert report["ids"] == [f"film{n}" for n in range(2 * WOMEN)]
    for arm in arms:  # every film scored once, by the fold that held it out
        oof = report["oof"][arm]
        assert len(oof) == 2 * WOMEN and all(np.isfinite(oof))
        assert auc(np.array(labels), np.array(oof)) == pytest.approx(
            report["summary"][arm]["auc"], abs=1e-4)


def _crops_for(feats: Features, boxes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """A canvas crop per film of the synthetic cache (its content box in pixels): a textured
    breast with a bright disc on the lesion cells, zeros nowhere inside the box."""
    rng = np.random.default_rng(9)
    crops = []
    for i, (h, w) in enumerate(boxes):
        crop = 0.2 + 0.3 * rng.random((1, 16 * h, 16 * w)).astype(np.float32)
        lesion = np.kron(feats.label["16"][i][:h, :w] == 1, np.ones((16, 16), bool))
        crop[0][lesion] = 0.95
        crops.append(torch.from_numpy(crop))
    return crops


def test_augment_mirrors_pixels_cells_and_labels_together_and_keeps_zeros() -> None:
    crop = torch.zeros(1, 64, 32)
    crop[0, :16, :16] = 0.5  # the top-left cell
    mask = np.zeros((4, 2), bool)
    mask[0, 0] = True
    label = np.zeros((4, 2), np.int8)
    label[0, 0] = 1
    mirrored = unmirrored = 0
    for seed in range(40):
        out, out_mask, out_label = topfit.augment(crop, mask, label, np.random.default_rng(seed))
        bright = out[0] > 0
        if out_mask[3, 0]:
            mirrored += 1
            assert bright[48:, :16].all() and not bright[:48].any()
            assert out_label[3, 0] == 1 and out_label.sum() == 1
        else:
            unmirrored += 1
            assert out_mask[0, 0] and bright[:16, :16].all() and not bright[16:].any()
        value = float(out[0][bright].mean())  # 0.5 ** gamma, gamma within exp(+-0.3)
        assert 0.5 ** np.exp(topfit.GAMMA_LOG_RANGE) - 1e-6 <= value
        assert value <= 0.5 ** np.exp(-topfit.GAMMA_LOG_RANGE) + 1e-6
    assert mirrored and unmirrored
    assert mask[0, 0] and label[0, 0] == 1  # the inputs are not changed in place


def test_the_whole_trunk_trains_end_to_end_and_its_maps_are_recomputed(cache: Path) -> None:
    feats = Features.load(cache)
    boxes = topfit.content_boxes(feats.level["32"])
    crops = _crops_for(feats, boxes)
    films = np.arange(len(feats.info))
    maps, mask, label = level_maps(feats, topfit.HEAD_LEVEL)
    model = topfit.WholeTrunk(LiteTrunk("efficientnet-lite0"),
                              fit_cells(maps, mask, label, films, feats.info, 1.0, 0))
    frozen_trunk = LiteTrunk("efficientnet-lite0")
    again, _ = topfit.recomputed_all(model, crops, feats)
    with torch.inference_mode():  # the untrained model's maps are the trunk's, on each box
        f16, f32 = frozen_trunk(crops[0][None])
    h, w = boxes[0]
    np.testing.assert_allclose(again.level["16"][0, :, :h, :w].astype(np.float32),
                               f16[0].numpy(), atol=2e-2)
    np.testing.assert_allclose(again.level["32"][0, :, :h // 2, :w // 2].astype(np.float32),
                               f32[0].numpy(), atol=2e-2)
    assert not again.level["16"][0, :, h:].any()  # zeros below the box, as the cache has
    stem = model.trunk.stem[0].weight.detach().clone()
    losses = topfit.train_all(model, crops, feats, films, seed=0, epochs=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not torch.equal(stem, model.trunk.stem[0].weight)  # the first layer trained too
    assert all(p.requires_grad for p in model.trunk.parameters())
    tuned, logits = topfit.recomputed_all(model, crops, feats)
    assert not np.array_equal(tuned.level["16"], again.level["16"])
    assert logits.shape == feats.label["16"].shape and np.isfinite(logits).all()


def test_a_trunk_from_scratch_is_seeded_starts_its_head_on_its_own_maps_and_trains_its_norms(
        cache: Path) -> None:
    """`--init scratch`: random weights (the same for the same seed, not ImageNet's), a head
    fitted on the random trunk's maps, the batch norms on each film's statistics while training
    and on their running statistics when the maps are recomputed."""
    feats = Features.load(cache)
    boxes = topfit.content_boxes(feats.level["32"])
    crops = _crops_for(feats, boxes)
    films = np.arange(len(feats.info))
    one = topfit.scratch_trunk("efficientnet-lite0", 3, crops, feats, films)
    two = topfit.scratch_trunk("efficientnet-lite0", 3, crops, feats, films)
    imagenet = LiteTrunk("efficientnet-lite0")
    stem = one.trunk.stem[0].weight.detach().clone()
    assert torch.equal(stem, two.trunk.stem[0].weight)
    assert not torch.equal(stem, imagenet.stem[0].weight)
    assert torch.equal(one.head.weight, two.head.weight) and one.head.weight.abs().sum() > 0
    norms = [m for m in one.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    running = norms[0].running_mean.clone()
    losses = topfit.train_all(one, crops, feats, films, seed=0, epochs=1,
                              trunk_lr=topfit.SCRATCH_LR, learn_norms=True)
    assert np.isfinite(losses).all() and all(m.training for m in norms)
    assert not torch.equal(running, norms[0].running_mean)  # running statistics updated
    assert not torch.equal(stem, one.trunk.stem[0].weight)
    _, logits = topfit.recomputed_all(one, crops, feats)
    assert not any(m.training for m in norms) and np.isfinite(logits).all()
    schedule = topfit.schedule_of("all", 6, "scratch")
    assert schedule["init"] == "scratch" and schedule["trunk_lr"] == topfit.SCRATCH_LR
    assert "init" not in topfit.schedule_of("all", 6)


def test_end_to_end_needs_the_films() -> None:
    with pytest.raises(SystemExit, match="--mias"):
        topfit.main(["--features", "unused", "--out", "unused", "--train", "all"])


def test_final_needs_the_whole_trunk() -> None:
    with pytest.raises(SystemExit, match="--train all"):
        topfit.main(["--features", "unused", "--out", "unused", "--final"])


@pytest.mark.parametrize("extra", [["--train", "stage"], ["--train", "all", "--final"]])
def test_a_trunk_from_scratch_is_only_an_outer_fold_comparison(extra: list[str]) -> None:
    with pytest.raises(SystemExit, match="--init scratch is a comparison"):
        topfit.main(["--features", "unused", "--out", "unused", "--mias", "unused",
                     "--init", "scratch", *extra])


# the recipes the nested run behind mias-baseline 0.5.0 chose in repeat 0's outer folds
NESTED_REPEAT0 = [
    ["lite0:16c", 0.01, "max", "diff", ["lite0:16", 0.1, "raw", "loc"]],
    ["lite0:16c", 0.001, "top3", "diff", ["lite0:16", 1.0, "raw", "loc"]],
    ["lite0:16c", 0.1, "max", "diff", ["lite0:16c", 1.0, "raw", "loc"]],
    ["lite0:16c", 0.01, "smooth3max", "diff", ["lite0:16c", 1.0, "raw", "loc"]],
    ["lite0:32", 0.01, "max", "diff", ["lite0:32", 1.0, "raw", "loc"]],
]


def test_inner_recipes_are_the_nested_runs_fold_choices() -> None:
    nested = {"metrics": {"recipes_chosen": [NESTED_REPEAT0]}}
    recipes = topfit.fold_recipes(nested, 0, 5, "build/cells/lite0")
    for recipe, (key, l2, pooling, contra, heat) in zip(recipes, NESTED_REPEAT0, strict=True):
        assert recipe == {"level": key.split(":")[1], "l2": l2, "pooling": pooling,
                          "contra": contra, "heat": {"level": heat[0].split(":")[1],
                                                     "l2": heat[1], "mode": heat[2],
                                                     "loss": heat[3]}}
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    shipped = topfit.shipped_recipe(metadata)  # the same shape as a fold's recipe
    assert set(shipped) == set(recipes[0]) and set(shipped["heat"]) == set(recipes[0]["heat"])
    with pytest.raises(SystemExit, match="folds"):
        topfit.fold_recipes(nested, 0, 6, "build/cells/lite0")
    with pytest.raises(SystemExit, match="repeat"):
        topfit.fold_recipes(nested, 1, 5, "build/cells/lite0")
    with pytest.raises(SystemExit, match="lite2"):
        topfit.fold_recipes(nested, 0, 5, "build/cells/lite2")
    # a bundle on a fine-tuned trunk keeps them as recipes, with whose choice they were
    tuned = {"metrics": {"recipes_chosen": [recipes, recipes], "recipes_kind": ["inner",
                                                                                "shipped"],
                         "recipes_features": "lite0"}}
    assert topfit.fold_recipes(tuned, 0, 5, "build/cells/lite0") == recipes
    with pytest.raises(SystemExit, match="did not fit the inner"):
        topfit.fold_recipes(tuned, 1, 5, "build/cells/lite0")
    with pytest.raises(SystemExit, match="lite2"):
        topfit.fold_recipes(tuned, 0, 5, "build/cells/lite2")
    if not metadata["training"]["arch_config"]["frozen"]:  # the shipped bundle is such a one
        assert metadata["metrics"]["recipes_kind"][0] == "inner"
        assert topfit.fold_recipes(metadata, 0, 5, "build/cells/lite0") == recipes


def test_inner_recipes_run_per_fold_and_every_films_peak_is_kept(cache: Path,
                                                                 tmp_path: Path) -> None:
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    folds = len(metadata["metrics"]["recipes_chosen"][0])
    assert topfit.main(["--features", str(cache), "--out", str(tmp_path / "out"),
                        "--bundle", str(BUNDLE), "--folds", str(folds), "--epochs", "1",
                        "--threads", "1", "--recipes", "inner"]) == 0
    report = json.loads((tmp_path / "out" / "topfit.json").read_text())
    assert report["recipes"] == "inner"
    assert [fold["recipe"] for fold in report["per_fold"]] == topfit.fold_recipes(
        metadata, 0, folds, str(cache))
    with_circle = [n % 4 == 1 for n in range(2 * WOMEN)]
    feats = Features.load(cache)
    assert report["placement"] == [item["placement"] for item in feats.info]
    for arm, summary in report["summary"].items():
        hits = report["hit"][arm]
        assert [h is not None for h in hits] == with_circle  # None: no circle to hit
        assert [sum(h for h in hits if h), sum(with_circle)] == summary["hits"]
        for x, y in report["peak_canvas_xy"][arm]:
            assert 0 <= x < GRID16[1] * 16 and 0 <= y < GRID16[0] * 16


def test_the_final_trunk_is_saved_and_loads_as_the_trunk_extract_runs(cache: Path,
                                                                      tmp_path: Path) -> None:
    import argparse

    from node.bundle import file_sha256

    feats = Features.load(cache)
    boxes = topfit.content_boxes(feats.level["32"])
    crops = _crops_for(feats, boxes)
    out = tmp_path / "final"
    args = argparse.Namespace(out=str(out), features=str(cache), train="all", epochs=1)
    assert topfit.final_trunk(args, feats, {"arch": "efficientnet-lite0"}, crops) == 0
    record = json.loads((out / "trunk.json").read_text())
    assert record["sha256"] == file_sha256(out / topfit.TRUNK_FILE)
    assert record["ids"] == [item["id"] for item in feats.info]
    assert record["schedule"] == topfit.schedule_of("all", 1) and len(record["train_loss"]) == 1
    trained = LiteTrunk("efficientnet-lite0", out / topfit.TRUNK_FILE)
    imagenet = LiteTrunk("efficientnet-lite0")
    folded = LiteTrunk("efficientnet-lite0", out / topfit.TRUNK_FILE).for_inference()
    with torch.inference_mode():
        f16, f32 = trained(crops[0][None])
        g16, _ = imagenet(crops[0][None])
        h16, h32 = folded(crops[0][None])
    assert not torch.allclose(f16, g16, atol=1e-3)  # the trained weights, not ImageNet's
    torch.testing.assert_close(h16, f16, atol=2e-3, rtol=0)  # what `extract --trunk` runs
    torch.testing.assert_close(h32, f32, atol=2e-3, rtol=0)


def _refused_by_final(cache: Path, tmp_path: Path, changes: dict[str, Any], match: str,
                      beside: bool = False) -> dict[str, Any]:
    """A copy of the cache whose info.json has `changes` (tmp_path/refused; with `beside`, the
    cache itself too) is refused by `cells final` with `match` in the message, writing no
    bundle; its info.json."""
    from tools.model import cells

    folder = tmp_path / "refused"
    shutil.copytree(cache, folder)
    info = json.loads((folder / "info.json").read_text())
    (folder / "info.json").write_text(json.dumps({**info, **changes}))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"features": [str(cache), str(folder)] if beside else str(folder),
                                  "ids": [image["id"] for image in info["images"]]}))
    with pytest.raises(SystemExit, match=match):
        cells.main(["final", "--nested", str(nested), "--out", str(tmp_path / "bundle"),
                    "--mias", str(tmp_path)])
    assert not (tmp_path / "bundle").exists()
    return info


def test_features_without_the_pectoral_cut_make_no_bundle(cache: Path, tmp_path: Path) -> None:
    """`cells extract --no-pectoral` is an ablation: the worker cuts the pectoral muscle where it
    finds it, so `cells final` refuses such features (a bundle from them would be scored on
    inputs unlike its training's), and their extract command says how they were made."""
    from tools.model import cells

    info = _refused_by_final(cache, tmp_path, {"pectoral": False}, "--no-pectoral")
    ablation = tmp_path / "refused"
    assert "--no-pectoral" in cells.extract_command(str(ablation), {**info, "pectoral": False})
    assert "pectoral" not in cells.extract_command(str(cache), info)


def test_features_of_the_second_pectoral_detector_say_so(cache: Path, tmp_path: Path) -> None:
    """Features extracted with `--pectoral-detector 2` carry it into the extract command and
    into a bundle's `input` (the worker then cuts the muscle as they were cut); `cells final`
    refuses feature folders extracted with different detectors."""
    from pipelines.preprocess import pectoral_detector
    from tools.model import cells

    assert "pectoral_detector" not in cells.input_metadata()  # detector 1: no key, as shipped
    assert pectoral_detector({"input": cells.input_metadata(pectoral_detector=2)}) == 2
    info = _refused_by_final(cache, tmp_path, {"pectoral_detector": 2},
                             "different pectoral detectors", beside=True)
    assert cells.extract_command(str(cache), {**info, "pectoral_detector": 2}).endswith(
        "--pectoral-detector 2 --threads 2")


def test_features_taking_their_cells_from_another_detector_say_so(cache: Path, tmp_path: Path
                                                                   ) -> None:
    """`cells extract --cell-mask-detector 2`: a bundle made from such features declares it
    (`input.cell_mask_detector`, the worker then negates the pixels its cells leave out), its
    extract command says so, and `cells final` refuses folders whose cells differ."""
    from pipelines.preprocess import cell_mask_detector
    from tools.model import cells

    info = json.loads((cache / "info.json").read_text())
    assert cells.cells_detector(info) == 1
    assert cells.cells_detector({**info, "cell_mask_detector": 2}) == 2
    assert cells.cells_detector({"pectoral_detector": 2}) == 2
    assert "cell_mask_detector" not in cells.input_metadata(cell_mask_detector=1)
    assert cell_mask_detector({"input": cells.input_metadata(cell_mask_detector=2)}) == 2
    assert cells.extract_command(str(cache), {**info, "cell_mask_detector": 2}).endswith(
        "--cell-mask-detector 2 --threads 2")
    assert "--cell-mask-detector" not in cells.extract_command(str(cache), info)
    _refused_by_final(cache, tmp_path, {"cell_mask_detector": 2}, "different detectors",
                      beside=True)


def test_compare_sets_two_nested_runs_side_by_side(cache: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`cells compare`: per repeat, both runs' AUCs and hits and the paired difference over
    women, read from the outer-fold scores; runs on other films or seeds are refused."""
    from tools.model import cells

    info = json.loads((cache / "info.json").read_text())["images"]
    ids = [image["id"] for image in info]
    labels = np.array([image["label"] for image in info])
    rng = np.random.default_rng(0)

    def run(path: Path, scores: list[np.ndarray], hits: list[int], seeds: tuple[int, ...]) -> str:
        reps = [{"repeat": r, "seed": seed, "oof": list(map(float, s)),
                 "auc": auc(labels, s), "malignant_auc": float("nan"), "lesion_hits": [h, 3]}
                for r, (s, h, seed) in enumerate(zip(scores, hits, seeds, strict=True))]
        path.write_text(json.dumps({"features": [str(cache)], "ids": ids,
                                    "spaces": {"contralateral": reps}}))
        return str(path)

    weak = [labels + rng.normal(scale=2.0, size=len(ids)) for _ in range(2)]
    strong = [labels * 3.0 + 0.1 * w for w in weak]
    base = run(tmp_path / "a.json", weak, [1, 2], (7, 8))
    assert cells.main(["compare", "--base", base,
                       "--other", run(tmp_path / "b.json", strong, [3, 3], (7, 8))]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith("| 0") or line.startswith("| 1")]
    assert len(rows) == 2 and all(" / 1.000 | +" in row for row in rows)
    assert all(row.endswith(f"{h} / 3 of 3 |") for row, h in zip(rows, (1, 2), strict=True))
    assert table[-1].endswith("lesion hits 3 / 6 of 6")
    with pytest.raises(SystemExit, match="other seeds"):
        cells.main(["compare", "--base", base,
                    "--other", run(tmp_path / "c.json", strong, [3, 3], (7, 9))])
    (tmp_path / "d.json").write_text(json.dumps({**json.loads(Path(base).read_text()),
                                                  "ids": ids[::-1]}))
    with pytest.raises(SystemExit, match="different films"):
        cells.main(["compare", "--base", base, "--other", str(tmp_path / "d.json")])


def test_compare_by_density_reads_each_runs_own_balanced_point(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`cells compare --mias`: each run's specificity among the normal films of each density,
    at the point Youden's J picks on that run's own out-of-fold scores."""
    from tools.model import cells
    from tools.model.dataset import Record

    labels = np.array([0, 0, 0, 0, 1, 1, 0, 0, 1, 1])
    density = ["F", "F", "D", "D", "F", "D", "G", "D", "G", "F"]
    ids = [f"m{i}" for i in range(10)]
    records = [Record(i, Path(i), f"w{n // 2}", "L", "MLO", int(y), 0, "left", density=d)
               for n, (i, y, d) in enumerate(zip(ids, labels, density, strict=True))]
    # base: the dense normals (2, 3, 7) score like the abnormal films; other: they do not
    base_scores = [0.1, 0.2, 0.8, 0.9, 0.85, 0.95, 0.15, 0.88, 0.9, 0.7]
    other_scores = [0.1, 0.2, 0.3, 0.25, 0.85, 0.95, 0.15, 0.35, 0.9, 0.7]
    base = {"ids": ids, "spaces": {"contralateral": [{"repeat": 0, "oof": base_scores}]}}
    other = {"ids": ids, "spaces": {"contralateral": [{"repeat": 0, "oof": other_scores}]}}
    cells.compare_by_density(base, other, "contralateral", labels, records)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 0 |")]
    # other: every abnormal film above every normal one, so its balanced point is perfect
    assert rows[1] == ("| 0 | other | 1.000 / 1.000 | 1.000 (2/2) | 1.000 (1/1) | "
                       "1.000 (3/3) |")
    threshold = metrics_points(labels, base_scores)
    below = np.array(base_scores) < threshold
    dense_normals = [i for i in range(10) if density[i] == "D" and labels[i] == 0]
    expected = sum(below[i] for i in dense_normals)
    assert rows[0].endswith(f"| {expected / 3:.3f} ({expected}/3) |")
    assert expected < 3  # base calls some dense normals suspicious
    assert "other: mean specificity over the repeats fatty 1.000" in out


def metrics_points(labels: np.ndarray, scores: list[float]) -> float:
    from tools.model.metrics import operating_points

    return operating_points(labels, np.array(scores))["balanced"]["threshold"]

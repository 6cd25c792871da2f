"""The committed model bundle: loads, refuses tampering, and maps heatmaps back exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from node.drift import normal_exam_flag_rate
from node.errors import ModelError
from pipelines.model import heatmap_to_image_grid, load_bundle
from pipelines.preprocess import build_preprocess, canvas_input, uses_canvas

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "mias-baseline"
MIAS = ROOT.parent / "shared" / "data" / "mias"


@pytest.fixture(scope="module")
def runner():
    return load_bundle(BUNDLE, "cpu")


def test_committed_bundle_is_a_trained_model_with_measured_metrics(runner) -> None:
    metadata = runner.metadata
    assert metadata["name"] == "mias-baseline"
    metrics = metadata["metrics"]
    assert 0.0 <= metrics["normal_vs_abnormal_auc"] <= 1.0
    low, high = metrics["normal_vs_abnormal_auc_ci95"]
    assert low <= metrics["normal_vs_abnormal_auc"] <= high
    assert "grouped by woman" in metrics["split"]
    assert 0.0 < runner.identity.operating_point < 1.0
    card = (BUNDLE / "README.md").read_text()
    assert "Research use only" in card and "Suckling" in card
    training = metadata["training"]  # rebuilt by tools/model, with the exact commands
    assert training["command"] in card and training["export_command"] in card
    if uses_canvas(metadata):  # ImageNet trunk + cell head (tools/model/cells.py)
        assert training["command"].startswith("python -m tools.model.cells extract ")
        assert training["arch_config"]["canvas"] == [metadata["input"]["height"],
                                                     metadata["input"]["width"]]
        assert "Apache-2.0" in card
        if training["arch_config"]["frozen"]:
            assert training["export_command"].startswith("python -m tools.model.cells final ")
            assert "nested cross-validation" in metrics["split"]
        else:  # the trunk fine-tuned (tools/model/topfit.py --final, tools/model/tuned.py)
            assert training["export_command"].startswith("python -m tools.model.tuned ")
            assert " --final " in training["command"] and " --trunk " in training["command"]
            assert "outer folds" in metrics["split"]
            assert training["arch_config"]["trunk"]["schedule"]["train"] == "all"
    else:
        assert training["command"].startswith("python -m tools.model.train ")
        assert training["export_command"].startswith("python -m tools.model.export ")
        assert training["arch_config"]["size"] == metadata["input"]["height"]
    assert set(metadata["operating_points"]) == {"balanced", "high_sensitivity",
                                                 "exam_specificity_90"}


def test_shipped_metrics_are_recomputed_from_the_shipped_out_of_fold_predictions(runner) -> None:
    """The card's numbers are not typed in: they follow from predictions.jsonl, woman-grouped folds."""
    from tools.model.metrics import auc, exam_operating_point, exam_scores, operating_points

    metadata = runner.metadata
    rows = [json.loads(line) for line in (BUNDLE / "predictions.jsonl").read_text().splitlines()]
    labels = np.array([r["label"] for r in rows])
    scores = np.array([r["score"] for r in rows])
    assert len(rows) == metadata["training"]["images"]
    assert auc(labels, scores) == pytest.approx(metadata["metrics"]["normal_vs_abnormal_auc"],
                                                abs=1e-3)
    folds_of_woman: dict[str, set[int]] = {}
    for r in rows:
        folds_of_woman.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(folds) == 1 for folds in folds_of_woman.values()), "a woman split across folds"
    # The operating points are on the scale the worker reports: the calibrated one.
    calibration = runner.calibration
    calibrated = scores if calibration is None else calibration.scores(scores)
    chosen = operating_points(labels, calibrated)
    groups = [r["group"] for r in rows]
    chosen["exam_specificity_90"] = exam_operating_point(labels, calibrated, groups, 0.9)
    for name, threshold in metadata["operating_points"].items():
        assert threshold == pytest.approx(chosen[name]["threshold"], abs=1e-3)
    # per exam (a woman's films, the highest score): what the card's table says
    exam_labels, exam_max = exam_scores(labels, calibrated, groups)
    for detail in metadata["operating_points_detail"].values():
        flagged = exam_max >= detail["threshold"]
        assert detail["exam_specificity"] == pytest.approx((~flagged[exam_labels == 0]).mean())
        assert detail["exam_sensitivity"] == pytest.approx(flagged[exam_labels == 1].mean())
    assert metadata["operating_points_detail"]["exam_specificity_90"]["exam_specificity"] >= 0.9
    hits = [r["hit"] for r in rows if r["hit"] is not None]
    assert [sum(hits), len(hits)] == list(metadata["metrics"]["lesion_hits"])


@pytest.mark.parametrize(("shape", "dtype", "maximum"), [
    ((1024, 1024), np.uint8, 255),
    ((2048, 1664), np.uint16, 4095),
    ((600, 480), np.uint16, 65535),
])
def test_predict_gives_probabilities_and_heatmaps_on_the_input_grid(runner, shape, dtype,
                                                                     maximum) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, maximum, size=shape).astype(dtype).astype(np.float32)
              for _ in range(2)]
    predictions = runner.predict(images)
    assert len(predictions) == 2
    for prediction in predictions:
        assert 0.0 <= prediction.probability <= 1.0
        assert prediction.heatmap.shape == shape and prediction.heatmap.dtype == np.float32
        assert 0.0 <= prediction.heatmap.min() and prediction.heatmap.max() <= 1.0
    assert set(runner.last_timings_s) == {"preprocess", "inference", "heatmap"}


def test_views_of_different_sizes_go_in_one_call(runner) -> None:
    rng = np.random.default_rng(3)
    images = [rng.random((900, 700), np.float32) * 255, rng.random((2294, 1914), np.float32) * 4095]
    predictions = runner.predict(images)
    assert [p.heatmap.shape for p in predictions] == [(900, 700), (2294, 1914)]


def test_bundle_is_small_enough_to_commit() -> None:
    total = sum(path.stat().st_size for path in BUNDLE.iterdir() if path.is_file())
    assert total < 25 * 1024 * 1024


def test_the_shipped_bundle_is_a_pt2_with_its_torchscript_copy(runner) -> None:
    """model.pt2 (torch.export) is the model; the TorchScript copy kept beside it is checked by
    its own sha256 and, loaded as an older bundle would be, scores exactly the same with one
    `model_format_deprecated` warning (next test)."""
    from node.bundle import file_sha256

    metadata = runner.metadata
    assert metadata["format"] == "pt2"
    assert metadata["model_sha256"] == file_sha256(BUNDLE / "model.pt2")
    assert metadata["torchscript_sha256"] == file_sha256(BUNDLE / "model.ts")
    assert not isinstance(runner.module, torch.jit.ScriptModule)


def test_the_shipped_torchscript_copy_still_loads_with_a_warning(runner, tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("model.ts", "predictions.jsonl", "README.md"):
        shutil.copyfile(BUNDLE / name, legacy / name)
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    metadata["format"] = "torchscript"
    metadata["model_sha256"] = metadata.pop("torchscript_sha256")
    (legacy / "metadata.json").write_text(json.dumps(metadata))
    with capture_logs() as logs:
        scripted = load_bundle(legacy, "cpu")
    warnings = [e for e in logs if e["event"] == "model_format_deprecated"]
    assert len(warnings) == 1 and warnings[0]["format"] == "torchscript"
    assert isinstance(scripted.module, torch.jit.ScriptModule)
    rng = np.random.default_rng(7)
    images = [rng.random((700, 560), np.float32) * 4095 for _ in range(3)]
    for old, new in zip(scripted.predict(images), runner.predict(images), strict=True):
        assert abs(old.probability - new.probability) <= 1e-6
        assert np.abs(old.heatmap - new.heatmap).max() <= 1e-6


def test_a_tampered_or_missing_pt2_is_refused(tmp_path: Path) -> None:
    bundle = _copy(tmp_path)
    with open(bundle / "model.pt2", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match=r"model\.pt2: sha256"):
        load_bundle(bundle, "cpu")
    (bundle / "model.pt2").unlink()
    with pytest.raises(ModelError, match="model.pt2 missing"):
        load_bundle(bundle, "cpu")


def test_same_input_same_output(runner) -> None:
    image = np.random.default_rng(2).random((512, 416)).astype(np.float32)
    first, second = runner.predict([image])[0], runner.predict([image])[0]
    assert first.probability == second.probability
    assert np.array_equal(first.heatmap, second.heatmap)


@pytest.mark.parametrize(("rows", "cols"), [(4096, 3328), (1000, 700), (333, 1024)])
def test_model_cell_maps_onto_the_source_pixels_it_covers(rows: int, cols: int) -> None:
    """A peak in model cell (i, j) lands where that cell's image region is."""
    height, width = 48, 40
    for i, j in [(0, 0), (10, 31), (47, 39), (24, 5)]:
        heatmap = np.zeros((height, width), np.float32)
        heatmap[i, j] = 1.0
        mapped = heatmap_to_image_grid(heatmap, rows, cols)
        assert mapped.shape == (rows, cols)
        peak_row, peak_col = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
        cell_rows, cell_cols = rows / height, cols / width
        assert i * cell_rows - 1 <= peak_row <= (i + 1) * cell_rows + 1
        assert j * cell_cols - 1 <= peak_col <= (j + 1) * cell_cols + 1


def _breast_with_block(rows: int, cols: int) -> np.ndarray:
    """A breast (half disc against the left edge) with a bright block inside it."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    image = np.where((yy - rows / 2) ** 2 + xx**2 <= (0.45 * rows) ** 2, 300.0, 0.0)
    image[rows // 2: rows // 2 + rows // 10, cols // 4: cols // 4 + rows // 10] = 1000.0
    return image.astype(np.float32)


def test_preprocess_is_what_the_model_sees(runner) -> None:
    """A bright block in the image shows up at the matching place of the model input."""
    rows, cols = 2000, 1600
    image = _breast_with_block(rows, cols)
    top, left, size = rows // 2, cols // 4, rows // 10
    if uses_canvas(runner.metadata):
        tensor, placement, _ = canvas_input(image, runner.metadata, "CC", 0.1)
        y0, x0 = placement.point_to_canvas(left, top)[::-1]
        y1, x1 = placement.point_to_canvas(left + size, top + size)[::-1]
    else:
        tensor = build_preprocess(runner.metadata)(image)
        height, width = tensor.shape[-2:]
        y0, y1 = top / rows * height, (top + size) / rows * height
        x0, x1 = left / cols * width, (left + size) / cols * width
    height, width = tensor.shape[-2:]
    row, col = np.unravel_index(int(torch.argmax(tensor[0])), (height, width))
    assert y0 - 1 <= row <= y1 + 1 and x0 - 1 <= col <= x1 + 1


def test_model_grid_maps_back_within_one_cell_on_a_portrait_image(runner) -> None:
    """The bundle's own grid, a 4096 x 3328 detector image: cell centres land on their pixels."""
    height, width = runner.metadata["output"]["heatmap_size"]
    rows, cols = 4096, 3328
    if uses_canvas(runner.metadata):  # the canvas's content region is the crop box
        _, placement, _ = canvas_input(_breast_with_block(rows, cols), runner.metadata, "CC", 0.07)
        i, j = placement.height // 3, (2 * placement.width) // 3
        heatmap = np.zeros((height, width), np.float32)
        heatmap[i, j] = 1.0
        mapped = heatmap_to_image_grid(heatmap, rows, cols, None, placement)
        peak_row, peak_col = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
        cell_rows = (placement.bottom - placement.top) / placement.height
        cell_cols = (placement.right - placement.left) / placement.width
        assert abs(peak_row - (placement.top + (i + 0.5) * cell_rows)) <= cell_rows
        assert abs(peak_col - (placement.left + (j + 0.5) * cell_cols)) <= cell_cols
        return
    i, j = height // 3, (2 * width) // 3
    heatmap = np.zeros((height, width), np.float32)
    heatmap[i, j] = 1.0
    mapped = heatmap_to_image_grid(heatmap, rows, cols)
    peak_row, peak_col = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
    expected_row, expected_col = (i + 0.5) * rows / height, (j + 0.5) * cols / width
    assert abs(peak_row - expected_row) <= rows / height
    assert abs(peak_col - expected_col) <= cols / width


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(BUNDLE, target)
    return target


def test_missing_bundle_pieces_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="folder not found"):
        load_bundle(tmp_path / "nowhere", "cpu")
    bundle = _copy(tmp_path)
    (bundle / "model.ts").unlink()
    with pytest.raises(ModelError, match="model.ts missing"):
        load_bundle(bundle, "cpu")
    (bundle / "metadata.json").unlink()
    with pytest.raises(ModelError, match="metadata.json missing"):
        load_bundle(bundle, "cpu")


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    bundle = _copy(tmp_path)
    with open(bundle / "model.ts", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle, "cpu")


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.pop("operating_points"), "missing key"),
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m["input"].update(orientation="chest_wall_right"), "orientation"),
    (lambda m: m["input"].update(height="tall"), "input"),
])
def test_mismatched_metadata_is_refused(tmp_path: Path, change, message: str) -> None:
    bundle = _copy(tmp_path)
    metadata = json.loads((bundle / "metadata.json").read_text())
    change(metadata)
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match=message):
        load_bundle(bundle, "cpu")


def test_unreadable_metadata_is_refused(tmp_path: Path) -> None:
    bundle = _copy(tmp_path)
    (bundle / "metadata.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_bundle(bundle, "cpu")


def test_model_whose_outputs_differ_from_its_metadata_is_refused(tmp_path: Path) -> None:
    """A model.ts from another bundle (with its checksum) fails the dry run, not a study."""
    bundle = _copy(tmp_path)
    metadata = json.loads((bundle / "metadata.json").read_text())
    metadata["output"]["heatmap_size"] = [64, 64]
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="heatmap_size"):
        load_bundle(bundle, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_refused() -> None:
    with pytest.raises(ModelError, match="no CUDA device"):
        load_bundle(BUNDLE, "cuda")


@pytest.mark.skipif(not (MIAS / "mdb001.png").is_file(), reason="../shared/data/mias absent")
def test_a_real_mias_film_goes_through(runner) -> None:
    from PIL import Image

    film = np.asarray(Image.open(MIAS / "mdb001.png"), dtype=np.float32)
    oriented = film[:, ::-1]  # mdb001: chest wall on the right
    if uses_canvas(runner.metadata):
        tensor, placement, mask = canvas_input(oriented, runner.metadata, "MLO", 0.2)
        assert placement.spacing_mm == pytest.approx(runner.metadata["input"]["pixel_spacing_mm"])
        assert 0.1 < mask.mean() < 0.6  # a breast, not the film or nothing
    else:
        tensor = build_preprocess(runner.metadata)(oriented)
    assert tuple(tensor.shape) == (1, *runner.metadata["output"]["heatmap_size"])
    assert tensor.dtype == torch.float32 and 0.0 <= float(tensor.min()) <= float(tensor.max()) <= 1.0
    [prediction] = runner.predict([film])
    assert prediction.heatmap.shape == film.shape
    assert 0.0 <= prediction.probability <= 1.0


@pytest.mark.skipif(not (MIAS / "mdb001.png").is_file(), reason="../shared/data/mias absent")
def test_heatmap_stays_on_the_breast(runner) -> None:
    """What the radiologist sees: no heatmap value, and so no peak or region mark, off the
    breast (film background, labels, pectoral muscle) or on the image border."""
    from PIL import Image

    from pipelines.breast import breast_mask

    if not uses_canvas(runner.metadata):
        pytest.skip("a whole-image bundle without a breast mask")
    for name in ("mdb001", "mdb028", "mdb102"):
        film = np.asarray(Image.open(MIAS / f"{name}.png"), dtype=np.float32)
        oriented = film[:, ::-1] if film[256:768, 512:].mean() > film[256:768, :512].mean() \
            else film
        [prediction] = runner.predict([oriented], ["MLO"], pixel_spacings=[0.2])
        heatmap = prediction.heatmap
        mask = breast_mask(oriented, "MLO")
        assert float(heatmap[~mask].max(initial=0.0)) == 0.0
        assert mask[np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)]
        border = 10
        assert float(heatmap[:border].max()) == float(heatmap[-border:].max()) == 0.0
        assert float(heatmap[:, :border].max()) == float(heatmap[:, -border:].max()) == 0.0
        assert heatmap.max() > 0.0


def test_the_runner_takes_any_operating_point_the_bundle_declares() -> None:
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    sensitive = load_bundle(BUNDLE, "cpu", "high_sensitivity").identity
    assert sensitive.operating_point_name == "high_sensitivity"
    assert sensitive.operating_point == metadata["operating_points"]["high_sensitivity"]
    assert sensitive.operating_point < metadata["operating_points"]["balanced"]
    with pytest.raises(ModelError, match=r"operating point 'strict' is not one the bundle "
                                         r"declares \(metadata.json operating_points: "
                                         r"balanced, exam_specificity_90, high_sensitivity\)"):
        load_bundle(BUNDLE, "cpu", "strict")


def test_each_point_says_how_many_normal_exams_it_flagged() -> None:
    """The figure the workers export for the recall-rate alerts: the card's per-exam table."""
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    exams = metadata["metrics"]["subgroups"]["exams"]["specificity"]
    for name in metadata["operating_points"]:
        rate = normal_exam_flag_rate(metadata, name)
        flagged = exams[name]["of"] - exams[name]["count"]
        assert rate == pytest.approx(flagged / exams[name]["of"])
    assert normal_exam_flag_rate(metadata, "strict") is None
    assert normal_exam_flag_rate({"operating_points": {"balanced": 0.5}}, "balanced") is None
    broken = {"operating_points_detail": {"balanced": {"exam_specificity": 1.5}}}
    assert normal_exam_flag_rate(broken, "balanced") is None


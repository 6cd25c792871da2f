"""The cell-head network of `tools/model/cells.py`: heatmap modes, the heat head and the
score-aligned heatmap, and the export the worker runs on smaller boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.model.cells import (
    PEAKS,
    CellHeadModel,
    FeatureBounds,
    HeadSpec,
    LiteTrunk,
    cell_features,
    choose_heat,
    fit_cells,
    fit_loc,
    hard_negative_cells,
    heatmap_logits,
    peak_hits,
)


def _cells() -> tuple[torch.Tensor, torch.Tensor]:
    inside = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    inside[0, 0, :, :4] = True  # the breast touches the left (chest wall) edge
    logits = torch.arange(30, dtype=torch.float32).view(1, 1, 6, 5)
    return logits, inside


def test_raw_mode_is_the_head_on_every_breast_cell() -> None:
    logits, inside = _cells()
    values, allowed = heatmap_logits(logits, inside, "raw")
    assert torch.equal(values, logits) and torch.equal(allowed, inside)


def test_smoothing_averages_breast_neighbours_only() -> None:
    logits, inside = _cells()
    values, _ = heatmap_logits(logits, inside, "smooth3")
    # cell (2, 3): neighbours in rows 1-3, columns 2-3 are breast; column 4 is not
    expected = logits[0, 0, 1:4, 2:4].mean()
    assert float(values[0, 0, 2, 3]) == pytest.approx(float(expected))
    # a cell away from every edge is the plain 3x3 mean
    assert float(values[0, 0, 2, 1]) == pytest.approx(float(logits[0, 0, 1:4, 0:3].mean()))


def test_erosion_drops_the_skin_line_but_not_the_canvas_edge() -> None:
    logits, inside = _cells()
    _, allowed = heatmap_logits(logits, inside, "erode")
    assert not bool(allowed[0, 0, :, 3].any())  # next to non-breast cells
    assert bool(allowed[0, 0, :, 0].all())      # the chest wall, on the canvas edge
    assert not bool(allowed[0, 0, :, 4].any())


def test_erosion_keeps_a_breast_too_small_to_erode() -> None:
    inside = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    inside[0, 0, 2, 2] = True
    _, allowed = heatmap_logits(torch.zeros(1, 1, 6, 5), inside, "smooth3-erode")
    assert torch.equal(allowed, inside)


def test_every_mode_keeps_the_heatmap_on_the_breast() -> None:
    logits, inside = _cells()
    for peak in PEAKS:
        _, allowed = heatmap_logits(logits, inside, peak)
        assert not bool((allowed & ~inside).any())


CANVAS = (256, 192)
CHANNELS = {"16": 112 + 320, "16c": 2 * (112 + 320), "32": 320 + 112}


def _head(level: str, seed: int) -> HeadSpec:
    rng = np.random.default_rng(seed)
    return HeadSpec(level, rng.normal(0, 0.05, CHANNELS[level]).astype(np.float32), -1.0)


def _breast(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, *CANVAS)
    x[:, :, :200, :120] = 0.1 + 0.9 * torch.rand(n, 1, 200, 120, generator=generator)
    return x


@pytest.fixture(scope="module")
def trunk() -> LiteTrunk:
    return LiteTrunk("efficientnet-lite0").for_inference()


@pytest.mark.parametrize(("score", "heat", "peak"), [("16", None, "raw"), ("16c", "32", "erode"),
                                                     ("32", "16", "smooth3")])
def test_heatmap_peaks_at_the_image_score_and_stays_on_the_breast(trunk, score, heat, peak) -> None:
    model = CellHeadModel(trunk, _head(score, 0), "top3", peak,
                          None if heat is None else _head(heat, 1))
    x = _breast(2)
    with torch.inference_mode():
        probability, heatmap = model(x)
    assert heatmap.shape == (2, 1, *CANVAS)
    for i in range(2):
        # bilinear upsampling never overshoots a cell, and the peak cell carries the score
        assert float(heatmap[i].max()) <= float(probability[i]) + 1e-5
        assert float(heatmap[i].max()) >= 0.5 * float(probability[i])
        assert float(heatmap[i, 0, 232:, :].max()) == 0.0  # below the breast's last cells
        assert float(heatmap[i, 0, :, 152:].max()) == 0.0


def test_feature_bounds_clip_each_levels_cells_before_its_head(trunk) -> None:
    """`tools.model.ceiling` (R1): a level's bounds clip its cell features channel by channel
    before the head reads them; bounds the features never reach change nothing."""
    model = CellHeadModel(trunk, _head("16c", 0), "top3", "raw", _head("16", 1))
    x = _breast(1)
    with torch.inference_mode():
        maps = cell_features(*model.trunk(x), "16c")
        plain = model(x)
        wide = maps.amin((0, 2, 3)) - 1.0, maps.amax((0, 2, 3)) + 1.0
        model.bounds = {"16c": FeatureBounds(*wide)}
        assert all(torch.equal(a, b) for a, b in zip(model(x), plain, strict=True))
        low, high = maps.quantile(0.2, dim=3).amin((0, 2)), maps.quantile(0.8, dim=3).amax((0, 2))
        model.bounds = {"16c": FeatureBounds(low, high)}
        clipped = model.features(*model.trunk(x), "16c")
        probability, _ = model(x)
        assert torch.equal(model.features(*model.trunk(x), "16"),
                           cell_features(*model.trunk(x), "16"))  # the other level: no bounds
    assert torch.equal(clipped, torch.maximum(torch.minimum(maps, high.view(1, -1, 1, 1)),
                                              low.view(1, -1, 1, 1)))
    assert bool((clipped != maps).any())
    inside = torch.nn.functional.avg_pool2d((x > 0).float(), 16) >= 0.5
    expected = torch.sigmoid(model.head(clipped).masked_fill(~inside, -1.0e4).flatten(1)
                             .topk(3).values.mean(1))
    assert torch.allclose(probability, expected, atol=1e-6)
    assert not torch.allclose(probability, plain[0], atol=1e-6)


def test_negated_pixels_are_image_but_not_breast_cells(trunk) -> None:
    """`input.cell_mask_detector`: the breast the cells leave out comes negated; the trunk reads
    |x| (the same maps, so the other cells' logits are unchanged) and those cells hold no
    heatmap and give no score."""
    model = CellHeadModel(trunk, _head("16", 0), "top3", "raw")
    x = _breast(1)
    cut = x.clone()
    cut[:, :, :64, :48] *= -1.0  # a 4 x 3 block of stride-16 cells at the chest wall's top
    with torch.inference_mode():
        plain_cells = model.head(cell_features(*model.trunk(x), "16"))
        cut_cells = model.head(cell_features(*model.trunk(cut.abs()), "16"))
        _, plain = model(x)
        probability, heatmap = model(cut)
    assert torch.equal(plain_cells, cut_cells)
    assert float(heatmap[0, 0, :56, :40].abs().max()) == 0.0  # no heat on the negated cells
    assert float(plain[0, 0, :56, :40].max()) > 0.0
    inside = torch.zeros_like(plain_cells, dtype=torch.bool)
    inside[:, :, :13, :8] = True  # the breast's stride-16 cells (200 x 120 pixels)
    inside[:, :, :4, :3] = False
    expected = torch.sigmoid(cut_cells.masked_fill(~inside, -1.0e4).flatten(1).topk(3).values
                             .mean(1))
    assert torch.allclose(probability, expected, atol=1e-6)


def test_the_unfolded_and_folded_trunks_agree() -> None:
    x = _breast(1)
    with torch.inference_mode():
        plain = LiteTrunk("efficientnet-lite0")(x)
        folded = LiteTrunk("efficientnet-lite0").for_inference()(x)
    for a, b in zip(plain, folded, strict=True):
        assert torch.allclose(a, b, atol=2e-3)


def test_export_runs_on_smaller_boxes_like_the_network(trunk, tmp_path) -> None:
    from node.bundle import MODEL_FILE, PT2_FILE
    from tools.model.cells import save_network

    model = CellHeadModel(trunk, _head("16c", 2), "top10", "smooth3-erode", _head("32", 3))
    (tmp_path / MODEL_FILE).write_bytes(b"an old copy")
    assert save_network(tmp_path, model, torchscript=False) is None
    assert not (tmp_path / MODEL_FILE).exists()  # no stale TorchScript copy beside the .pt2
    program = torch.export.load(str(tmp_path / PT2_FILE))
    x = _breast(1)[:, :, :224, :160].contiguous()
    with torch.inference_mode():
        for expected, got in zip(model(x), program.module()(x), strict=True):
            assert expected.shape == got.shape
            assert torch.allclose(expected, got, atol=1e-4)


def _films(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Films of 8 x 6 cells: channel 0 is high on dense tissue (in every film, lesion or not),
    channel 1 a weaker but lesion-specific cue; one lesion cell per abnormal film."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 1, (n, 4, 8, 6)).astype(np.float32)
    mask = np.ones((n, 8, 6), bool)
    mask[:, :, 5] = False  # off the breast
    label = np.zeros((n, 8, 6), np.int8)
    info = []
    for i in range(n):
        dense = rng.integers(0, 8, 3), rng.integers(0, 5, 3)
        maps[i, 0][dense] += 4.0
        lesion = i % 2 == 0
        if lesion:
            r, c = int(rng.integers(0, 8)), int(rng.integers(0, 5))
            maps[i, 0, r, c] += 2.0
            maps[i, 1, r, c] += 2.5
            label[i, r, c] = 1
        info.append({"id": str(i), "flip": 0, "label": int(lesion), "has_lesions": lesion,
                     "lesions": [[(c + 0.5) * 16 - 0.5, (r + 0.5) * 16 - 0.5, 4.0]] if lesion
                     else []})
    return maps, mask, label, info


def test_the_localisation_head_puts_the_peak_on_the_lesion_not_on_dense_tissue() -> None:
    """The logistic head on a sample of background cells learns "dense = suspicious" (channel 0
    separates lesions from an average background cell); the per-film softmax sees each film's
    dense cells as its hardest negatives and learns the lesion-specific cue."""
    maps, mask, label, info = _films(120, 0)
    test_maps, test_mask, _, test_info = _films(60, 1)
    train = np.arange(120)
    bce = fit_cells(maps, mask, label, train, info, 0.01, 0, negatives=4)
    loc = fit_loc(maps, mask, label, train, info, 0.01)
    assert loc.b == 0.0
    bce_hits, total, _ = peak_hits(bce.logits(test_maps), test_mask, test_info, 16)
    loc_hits, total2, per = peak_hits(loc.logits(test_maps), test_mask, test_info, 16)
    assert total == total2 == 30 and len(per) == 60
    assert loc_hits >= 24 and loc_hits > bce_hits, (loc_hits, bce_hits)
    # relative to the dense-tissue channel, the softmax head weighs the lesion cue more
    assert loc.w[1] / loc.w[0] > bce.w[1] / bce.w[0] > 0


def test_a_localisation_head_ignores_films_without_a_circle() -> None:
    maps, mask, label, info = _films(20, 2)
    with_normals = fit_loc(maps, mask, label, np.arange(20), info, 0.1)
    lesions_only = fit_loc(maps, mask, label, np.arange(0, 20, 2), info, 0.1)
    assert np.abs(with_normals.w).max() > 0.1
    assert np.allclose(with_normals.w, lesions_only.w, atol=1e-6)
    assert np.allclose(with_normals.mean, lesions_only.mean)


def test_heat_choice_prefers_more_hits_then_the_score_head_then_the_logistic_loss() -> None:
    hits = {("a:16", 0.01, "raw", "bce"): 5, ("a:32", 0.1, "raw", "bce"): 7,
            ("a:32", 1.0, "erode", "loc"): 7, ("a:16c", 0.1, "raw", "loc"): 6}
    assert choose_heat(hits, "a:16", 0.01) == ("a:32", 0.1, "raw", "bce")
    hits[("a:16", 0.01, "erode", "bce")] = 7
    assert choose_heat(hits, "a:16", 0.01) == ("a:16", 0.01, "erode", "bce")
    hits[("a:16c", 0.1, "raw", "loc")] = 8
    assert choose_heat(hits, "a:16", 0.01) == ("a:16c", 0.1, "raw", "loc")


def test_heat_head_comes_from_the_score_heads_trunk() -> None:
    """The bundle runs one trunk: a heat head on another feature set is never chosen, however
    many lesions it hits."""
    hits = {("lite0:16c", 0.01, "raw", "bce"): 5, ("lite0:16", 0.1, "raw", "loc"): 6,
            ("lite2:16", 0.1, "raw", "loc"): 9}
    assert choose_heat(hits, "lite0:16c", 0.01) == ("lite0:16", 0.1, "raw", "loc")
    assert choose_heat(hits, "lite2:16c", 0.01) == ("lite2:16", 0.1, "raw", "loc")


def test_the_heat_scale_gives_the_heat_head_the_score_heads_spread() -> None:
    from tools.model.cells import heat_scale_of

    rng = np.random.default_rng(0)
    score, heat = rng.normal(0, 3, (4, 8, 6)), rng.normal(5, 0.5, (4, 8, 6))
    mask = np.ones((4, 8, 6), bool)
    mask[:, :, 5] = False
    heat[:, :, 5] = 1e3  # off the breast: not counted
    scale = heat_scale_of(score, mask, heat, mask)
    assert np.std(heat[mask] * scale) == pytest.approx(np.std(score[mask]))


def test_hard_negatives_are_each_films_highest_scoring_background_cells() -> None:
    maps, mask, label, info = _films(6, 3)
    label[0][0, 0] = -1  # a ring cell: neither lesion nor background
    mask[1][:, :] = False
    mask[1][2, 2] = True  # film 1: one breast cell
    info[2] = {**info[2], "has_lesions": False}  # abnormal without a circle: left out
    model = fit_cells(maps, mask, label, np.arange(6), info, 0.01, 0, negatives=4)
    extra = hard_negative_cells(model, maps, mask, label, np.arange(6), info, 3)
    expected = []
    for i in (0, 1, 3, 4, 5):
        logits = model.logits(maps[i][None])[0]
        cells = np.argwhere(mask[i] & (label[i] == 0))
        order = np.argsort(-logits[cells[:, 0], cells[:, 1]], kind="stable")[:3]
        expected += [maps[i][:, r, c] for r, c in cells[order]]
    assert extra.shape == (3 + 1 + 3 + 3 + 3, 4)  # film 1 has one background cell
    np.testing.assert_array_equal(extra, np.stack(expected))


def test_hard_negatives_teach_the_head_that_dense_tissue_is_not_a_lesion() -> None:
    """Films with dense cells (channel 0) on normal and abnormal films alike and a lesion cue
    (channels 0 and 1) on the lesion: random background cells rarely include the dense ones,
    so the plain head leans on channel 0; a second fit with each film's highest-scoring
    background cells (the dense ones) leans more on the lesion's own cue, and its peaks land
    on the lesion at least as often."""
    maps, mask, label, info = _films(120, 0)
    test_maps, test_mask, _, test_info = _films(60, 1)
    plain = fit_cells(maps, mask, label, np.arange(120), info, 0.01, 0, negatives=4)
    hard = fit_cells(maps, mask, label, np.arange(120), info, 0.01, 0, negatives=4, hard=2)
    assert hard.w[1] / hard.w[0] > 1.1 * (plain.w[1] / plain.w[0]) > 0
    plain_hits, _, _ = peak_hits(plain.logits(test_maps), test_mask, test_info, 16)
    hard_hits, _, _ = peak_hits(hard.logits(test_maps), test_mask, test_info, 16)
    assert hard_hits >= plain_hits


def test_centred_maps_are_each_films_features_about_its_own_breast_mean() -> None:
    from tools.model.cells import centre_maps

    rng = np.random.default_rng(4)
    maps = rng.normal(2.0, 1.0, (3, 4, 8, 6)).astype(np.float32)
    mask = np.ones((3, 8, 6), bool)
    mask[:, :, 5] = False
    mask[2] = False  # a film without breast cells stays as it is
    centred = centre_maps(maps, mask)
    for i in (0, 1):
        np.testing.assert_allclose(centred[i][:, mask[i]].mean(1), 0.0, atol=1e-5)
        # every cell moves by the same amount per channel: differences between cells are kept
        np.testing.assert_allclose(centred[i] - centred[i][:, :1, :1], maps[i] - maps[i][:, :1, :1],
                                   atol=1e-5)
    np.testing.assert_array_equal(centred[2], maps[2])
    # a shift of a whole film's features (how its detector renders every cell) is gone
    shifted = maps + rng.normal(0, 3, (3, 4, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(centre_maps(shifted, mask)[:2], centred[:2], atol=1e-4)



def test_nested_takes_one_diagnostic_reading_at_a_time(capsys) -> None:
    from tools.model.cells import main

    with pytest.raises(SystemExit):
        main(["nested", "--features", "unused", "--out", "unused", "--centre", "--contra-cells"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_contra_cell_maps_keep_the_features_and_add_what_the_other_breast_lacks() -> None:
    """C1: each film's features, then their difference from the other breast's local breast
    mean at the same cells; tissue both breasts share cancels, a finding in one stands out."""
    from tools.model.cells import contra_cell_maps, other_breast_row

    rng = np.random.default_rng(7)
    shared = rng.normal(1.0, 0.5, (3, 12, 8)).astype(np.float32)
    maps = np.stack([shared, shared, shared])  # films 0 and 1: one woman; film 2: no pair
    maps[0, :, 5, 3] += 4.0  # a finding in the left breast only
    mask = np.ones((3, 12, 8), bool)
    mask[:, :, 6:] = False
    info = [{"group": "a", "laterality": "L", "flip": 0}, {"group": "a", "laterality": "R",
                                                           "flip": 0},
            {"group": "b", "laterality": "L", "flip": 0}]
    assert other_breast_row(info) == [1, 0, None]
    out = contra_cell_maps(maps, mask, info, 16)  # a 5 x 5-cell window at stride 16
    assert out.shape == (3, 6, 12, 8)
    np.testing.assert_array_equal(out[:, :3], maps)
    np.testing.assert_array_equal(out[2, 3:], 0.0)  # no pair, no difference
    difference = out[0, 3:]
    # the finding stands out in its breast's difference, by all of it less its share of the
    # window it sits in on the other side (nothing: the other breast lacks it)
    local = shared[:, 3:8, 1:6][:, mask[1][3:8, 1:6]].mean(1)
    np.testing.assert_allclose(difference[:, 5, 3], shared[:, 5, 3] + 4.0 - local, atol=1e-5)
    # the other breast reads the finding as missing at that place: a negative difference there
    left = maps[0][:, 3:8, 1:6].mean((1, 2))
    np.testing.assert_allclose(out[1, 3:, 5, 3], shared[:, 5, 3] - left, atol=1e-5)
    assert (out[1, 3:, 5, 3] < difference[:, 5, 3]).all()
    # uniform tissue in both breasts: the difference is the cell's own texture only
    flat = np.ones_like(maps)
    np.testing.assert_allclose(contra_cell_maps(flat, mask, info, 32)[:2, 3:], 0.0, atol=1e-6)


@pytest.mark.parametrize(("flag", "option"), [("centre", "--centre"),
                                              ("contra_cells", "--contra-cells")])
def test_final_makes_no_bundle_from_a_diagnostic_nested_run(tmp_path, flag, option) -> None:
    import json

    from tools.model.cells import main

    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"features": ["nowhere"], flag: True}))
    with pytest.raises(SystemExit, match=f"{option}, a diagnostic"):
        main(["final", "--nested", str(nested), "--out", str(tmp_path / "bundle"),
              "--mias", str(tmp_path)])
    assert not (tmp_path / "bundle").exists()

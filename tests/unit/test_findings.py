"""What a finding is: the regions of a heatmap at or above the operating point, in source pixels."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.attribution import RESEARCH_USE_LABEL, contributing_equipment, series_description
from pipelines.findings import MAX_FINDINGS_PER_IMAGE, find_findings
from pipelines.results import ModelIdentity


def _heatmap() -> np.ndarray:
    heatmap = np.zeros((100, 80), np.float32)
    heatmap[10:20, 30:50] = 0.9
    heatmap[15, 40] = 0.95  # the strongest region's peak
    heatmap[60:62, 5:7] = 0.8  # 4 pixels: an island too small to be a region
    heatmap[70:90, 60:70] = 0.7
    return heatmap


def test_regions_above_the_threshold_strongest_first_in_dicom_image_coordinates() -> None:
    findings = find_findings(_heatmap(), threshold=0.6)
    assert [round(f.score, 2) for f in findings] == [0.95, 0.7]
    first = findings[0]
    assert first.peak == (40.5, 15.5)  # (column, row) of the peak pixel's centre
    assert first.centroid == (40.0, 15.0)
    assert first.bounding_box == (30, 10, 49, 19)
    assert first.area_px == 200 and first.mask.sum() == 200 and first.mask[15, 40]
    # ELLIPSE: the major axis (horizontal here, 20 px) first, then the minor axis (10 px)
    assert first.ellipse() == ((30.0, 15.0), (50.0, 15.0), (40.0, 10.0), (40.0, 20.0))
    assert findings[1].ellipse()[0] == (65.0, 70.0)  # a tall region: vertical major axis


def test_threshold_decides_and_small_islands_are_not_regions() -> None:
    assert find_findings(_heatmap(), threshold=0.96) == ()
    assert len(find_findings(_heatmap(), threshold=0.75)) == 1
    assert len(find_findings(_heatmap(), threshold=0.6, min_area_px=1)) == 3


def test_the_island_of_the_maps_peak_is_a_finding_however_small() -> None:
    """The heatmap's peak is the image's score: an image at the threshold has a finding even
    when only a few pixels around the peak clear it; other specks still do not count."""
    heatmap = np.zeros((100, 80), np.float32)
    heatmap[40:42, 20:22] = 0.81  # 4 pixels, the highest of the map
    heatmap[60, 60] = 0.805  # a speck, not the peak
    findings = find_findings(heatmap, threshold=0.8)
    assert len(findings) == 1 and findings[0].area_px == 4 and findings[0].peak == (20.5, 40.5)
    assert find_findings(heatmap, threshold=0.82) == ()


def test_at_most_a_few_findings_per_image() -> None:
    heatmap = np.zeros((100, 100), np.float32)
    for index in range(6):
        heatmap[index * 15:index * 15 + 8, 10:18] = 0.5 + index * 0.05
    findings = find_findings(heatmap, threshold=0.5)
    assert len(findings) == MAX_FINDINGS_PER_IMAGE
    assert [round(f.score, 2) for f in findings] == [0.75, 0.7, 0.65]


def test_regions_on_the_grid_edges_and_ties_in_raster_order() -> None:
    """Regions are labelled inside the box of the pixels above the threshold: a region on the
    last row and column keeps its full-grid place, and equal peaks stay in raster order."""
    heatmap = np.zeros((120, 90), np.float32)
    heatmap[100:120, 80:90] = 0.8  # bottom-right corner
    heatmap[30:40, 50:60] = 0.8  # same peak, earlier in raster order
    heatmap[30:34, 10:14] = 0.8  # same row band, further left: first in raster order
    findings = find_findings(heatmap, threshold=0.5)
    assert [f.bounding_box for f in findings] == [(10, 30, 13, 33), (50, 30, 59, 39),
                                                  (80, 100, 89, 119)]
    corner = findings[2]
    assert corner.mask.shape == heatmap.shape and corner.mask.sum() == corner.area_px == 200
    assert corner.mask[119, 89] and not corner.mask[99, 79]
    assert corner.peak == (80.5, 100.5) and corner.centroid == (85.0, 110.0)


def test_refuses_a_heatmap_that_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="2-D"):
        find_findings(np.zeros((1, 10, 10), np.float32), threshold=0.5)


def test_every_object_names_the_model_the_software_and_research_use() -> None:
    item = contributing_equipment(ModelIdentity("mias-baseline", "0.2.0", 0.5))[0]
    assert item.ManufacturerModelName == "mias-baseline"
    assert "model 0.2.0" in item.SoftwareVersions
    assert RESEARCH_USE_LABEL in item.ContributionDescription
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert series_description("AI mammography report") == "AI mammography report - research use only"
    assert len(series_description("x" * 80)) == 64
    assert series_description("x" * 80).endswith("research use only")

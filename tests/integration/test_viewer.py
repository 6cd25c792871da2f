"""Our results in the viewer most sites try first: OHIF 3.13.2 over Orthanc's DICOMweb plugin.

The hospital flow on real parts: Redis, Orthanc (the PACS, with DICOMweb), `mammo-node serve`
and a worker (tools/stack/node_stack.py), OHIF served by tools/stack/viewer.py. The study is
stored in Orthanc first and Orthanc sends it to the node; the results come back beside the
images. Then Debian's Chromium, headless, driven by playwright-core (tests/support/ohif_driver.js),
opens the study, shows the view with the heatmap's peak, loads our SR and that view's SEG, and
takes screenshots. They are kept under the test's tmp dir and copied to build/viewer/.

What OHIF shows is read from the page (text, display sets, console) and from the screenshots'
pixels: the overlay must change the pixels at the peak (mapped from image to screen through
cornerstone's own transforms) and leave the background outside the breast alone.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from scipy import ndimage

from pipelines.seg import read_seg_heatmap, read_seg_regions
from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack
from tools.stack.services import find_dicomweb_plugin
from tools.stack.viewer import VIEWER_DIR, ViewerServer, ohif_installed

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "support" / "ohif_driver.js"
BUILD_COPY = ROOT / "build" / "viewer"
ROWS, COLS = 1024, 832
LESION_VIEW = "L-MLO"
DRIVER_TIMEOUT_S = 300
# Mean absolute RGB change (0..255) of a small patch: the overlay's tint at the peak is far above
# this; the background outside the breast must not move at all beyond rendering noise.
OVERLAY_MIN_CHANGE = 12.0
BACKGROUND_MAX_CHANGE = 2.0
PATCH_HALF = 3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("Orthanc", "redis-server", "node", "chromium"),
]


@dataclass(frozen=True)
class ViewerSession:
    """What the browser saw, and what we know the objects hold."""

    result: dict[str, Any]
    out_dir: Path
    sr: Dataset
    sr_numbers: list[float]
    record: dict[str, Any]
    source_sop_uids: set[str]
    peak_view_sop_uid: str
    peak_inside_breast: bool


def _numeric_values(item: Dataset) -> Iterator[float]:
    """Every NUM value anywhere in an SR content tree."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "NUM":
            yield float(child.MeasuredValueSequence[0].NumericValue)
        yield from _numeric_values(child)


def _region_mask(seg: Dataset) -> np.ndarray:
    if seg.SegmentationType == "BINARY":
        return read_seg_regions(seg)
    return read_seg_heatmap(seg) >= 0.5


def _deepest_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of the mask farthest from its edge and from the image's border: well inside the
    region, whatever its shape."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), mask.shape)
    return int(row), int(col)


def _patch(png: Path, x: float, y: float) -> np.ndarray:
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    col, row = int(round(x)), int(round(y))
    return pixels[row - PATCH_HALF: row + PATCH_HALF + 1, col - PATCH_HALF: col + PATCH_HALF + 1]


def _prerequisites() -> None:
    if not ohif_installed():
        pytest.fail(f"OHIF's build is not in {VIEWER_DIR}: run `make install`", pytrace=False)
    if not (VIEWER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail(f"playwright-core is not in {VIEWER_DIR}: run `make install`", pytrace=False)
    find_dicomweb_plugin()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerSession]:
    _prerequisites()
    work = tmp_path_factory.mktemp("viewer")
    stack = NodeStack(work / "stack", quiet_period_s=2, dicomweb=True)
    stack.redis.persist = True
    stack.orthanc.persist = True
    viewer: ViewerServer | None = None
    try:
        stack.start()
        paths = make_study(work / "study", rows=ROWS, cols=COLS, seed=7, lesions=[LESION_VIEW])
        sources = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in paths)}
        study_uid = str(next(iter(sources.values())).StudyInstanceUID)
        stack.send_through_pacs(paths)  # the hospital flow: PACS first, then the node
        ids = stack.wait_for_results(study_uid, seg_count=len(paths))
        record = stack.wait_for_record(study_uid)
        [sr_id] = ids["sr"]
        sr = dcmread(io.BytesIO(stack.orthanc.get_instance_file(sr_id)))

        # The view with the highest score; the peak is the deepest point of its SEG's regions
        peak_view = max(record["scores"]["views"], key=record["scores"]["views"].get)
        segs = [dcmread(io.BytesIO(stack.orthanc.get_instance_file(i))) for i in ids["seg"]]
        by_source = {
            str(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                .ReferencedSOPInstanceUID): seg for seg in segs
        }
        [peak_sop] = [uid for uid, ds in sources.items()
                      if f"{ds.ImageLaterality}-{ds.ViewPosition}" == peak_view]
        mask = _region_mask(by_source[peak_sop])
        assert mask.any(), f"the SEG of {peak_view} (score {record['scores']['views']}) is empty"
        peak = _deepest_point(mask)
        source_pixels = sources[peak_sop].pixel_array
        background = float(np.percentile(source_pixels, 1))
        breast = source_pixels > background + 0.1 * (float(source_pixels.max()) - background)
        outside = _deepest_point(~ndimage.binary_dilation(breast, iterations=20))

        viewer = ViewerServer(stack.orthanc.dicomweb_url).start()
        out_dir = work / "screenshots"
        out_dir.mkdir()
        plan = {
            "url": viewer.study_url(study_uid),
            "outDir": str(out_dir),
            "userDataDir": str(work / "chromium-profile"),  # a fresh profile every run
            "expectedDisplaySets": 4 + 1 + 1,  # images, our SR, at least one SEG series
            "view": {"sopUid": peak_sop, "peak": list(peak), "outside": list(outside)},
            "srSeriesNumber": int(sr.SeriesNumber),
            "srSopUid": str(sr.SOPInstanceUID),
            "timeoutMs": 90_000,
        }
        plan_path = work / "plan.json"
        plan_path.write_text(json.dumps(plan))
        driver = subprocess.run(["node", str(DRIVER), str(plan_path)], cwd=ROOT,
                                capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S,
                                check=False)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        result = json.loads((out_dir / "result.json").read_text())
        BUILD_COPY.mkdir(parents=True, exist_ok=True)
        for name, file in result["screenshots"].items():
            shutil.copy2(file, BUILD_COPY / f"{name}.png")
            print(f"screenshot {name}: {file} (copy in {BUILD_COPY})")
        (BUILD_COPY / "result.json").write_text(json.dumps(result, indent=1))
        yield ViewerSession(
            result=result, out_dir=out_dir, sr=sr, sr_numbers=list(_numeric_values(sr)),
            record=record, source_sop_uids=set(sources), peak_view_sop_uid=peak_sop,
            peak_inside_breast=bool(breast[peak]),
        )
    finally:
        if viewer is not None:
            viewer.stop()
        stack.stop()


def test_ohif_opens_the_study_from_the_pacs_and_draws_the_images(session: ViewerSession) -> None:
    result = session.result
    assert "image" in result["steps"], result.get("error")
    images = [ds for ds in result["displaySets"] if ds["modality"] == "MG"]
    assert {uid for ds in images for uid in ds["sopUids"]} == session.source_sop_uids
    # The image loader takes the images' VOI LUT Function (our install-time patch of OHIF)
    assert not any("Invalid VOI LUT function" in line for line in result["console"])
    assert "Something went wrong" not in result["srText"]
    # The breast is drawn at the peak's screen position, the background around it is dark
    [peak, outside] = result["imageMapping"]["points"]
    image = session.out_dir / "02-image.png"
    assert session.peak_inside_breast
    assert _patch(image, *peak).mean() > 3 * max(_patch(image, *outside).mean(), 5.0)


def test_ohif_lists_our_sr_and_draws_its_region_marks_with_their_scores(
        session: ViewerSession) -> None:
    result = session.result
    assert "sr" in result["steps"], result.get("error")
    [listed] = [ds for ds in result["displaySets"]
                if ds["modality"] == "SR" and ds["seriesNumber"] == int(session.sr.SeriesNumber)]
    assert listed["description"] == session.sr.SeriesDescription
    assert not any("ReferencedSOPSequence" in line for line in result["console"] + result["pageErrors"])
    # OHIF labels each drawn mark with its measurement: one of the SR's scores, 2 decimals
    drawn = result["srViewportText"].splitlines()
    shown = {float(v) for v in re.findall(r"score:\s*([01]\.\d+)", result["srViewportText"])}
    assert shown, f"no score drawn in the SR viewport: {result['srViewportText']!r}"
    assert shown <= {round(v, 2) for v in session.sr_numbers}
    # ... every measurement of the image shown, and those only; region marks among them
    on_image = [m for m in result["srMeasurements"]
                if m["referencedSopUid"] and m["referencedSopUid"] in result["srShownImageId"]]
    assert len(drawn) == len(on_image) > 0
    assert any(m["graphicType"] in ("ELLIPSE", "POLYLINE", "CIRCLE") for m in on_image)


def _tracking_values(item: Dataset, tracking: str = "") -> Iterator[tuple[str, float]]:
    """(tracking identifier of the enclosing group, value) for every NUM of an SR."""
    children = list(item.get("ContentSequence", []))
    for child in children:
        concept = child.get("ConceptNameCodeSequence")
        if child.get("ValueType") == "TEXT" and concept and concept[0].CodeMeaning == "Tracking Identifier":
            tracking = str(child.TextValue)
    for child in children:
        if child.get("ValueType") == "NUM":
            yield tracking, float(child.MeasuredValueSequence[0].NumericValue)
        yield from _tracking_values(child, tracking)


def test_ohif_shows_the_per_breast_and_per_exam_scores_as_text(session: ViewerSession) -> None:
    """Each breast's and the exam's score is a measurement OHIF reads and labels with its value;
    those on the image shown (the peak's view) are drawn. Which level a drawn label belongs to is
    not on screen: OHIF draws the concept name, value, unit and finding site only."""
    scores = session.record["scores"]
    levels = {"exam": scores["exam"], **{f"breast {side}": v for side, v in scores["breasts"].items()}}
    in_sr = dict(_tracking_values(session.sr))
    parsed = {m["trackingIdentifier"]: m for m in session.result["srMeasurements"]}
    drawn_any = False
    for level, value in levels.items():
        [tracking] = [t for t in in_sr if t.lower() == level.lower()]
        assert in_sr[tracking] == pytest.approx(value, abs=1e-6)
        assert tracking in parsed, f"OHIF did not read the {level} score (no image region?)"
        assert any(f"{value:.2f}" in label for label in parsed[tracking]["labels"])
        if parsed[tracking]["referencedSopUid"] in session.result["srShownImageId"]:
            assert f"{value:.2f}" in session.result["srViewportText"]
            drawn_any = True
    assert drawn_any  # the exam score sits on the peak's view, shown first


def test_ohif_draws_the_heatmap_overlay_inside_the_breast_at_the_peak(
        session: ViewerSession) -> None:
    result = session.result
    referencing = [ds for ds in result["segDisplaySets"]
                   if session.peak_view_sop_uid in ds["referencedSopUids"]]
    assert referencing, f"no SEG display set over the peak's view: {result['segDisplaySets']}"
    assert "seg" in result["steps"], result.get("error")
    assert result["segmentations"], "OHIF loaded no segmentation"
    before, after = session.out_dir / "02-image.png", session.out_dir / "04-seg.png"
    [peak_before, outside_before] = result["imageMapping"]["points"]
    [peak_after, outside_after] = result["segMapping"]["points"]
    assert session.peak_inside_breast
    change_at_peak = np.abs(_patch(after, *peak_after) - _patch(before, *peak_before)).mean()
    change_outside = np.abs(_patch(after, *outside_after) - _patch(before, *outside_before)).mean()
    assert change_at_peak > OVERLAY_MIN_CHANGE, change_at_peak
    assert change_outside < BACKGROUND_MAX_CHANGE, change_outside


def test_ohif_lists_each_view_outside_the_models_domain_as_such(session: ViewerSession) -> None:
    """OHIF 3.13's SR view draws the measurement groups only, not the SR's text, so the caveat
    for a view the model was not trained on (this synthetic digital study's views) is in what
    OHIF does show: the series list, where each view's SEG is its own series."""
    flagged = {i["sop_uid"] for i in session.record["inputs"]
               if any(f.startswith("outside_domain:") for f in i.get("quality_flags") or [])}
    assert flagged  # ~0.2 mm digital pixels and CC views: outside the film-MLO bundle's domain
    segs = session.result["segDisplaySets"]
    assert {uid for ds in segs for uid in ds["referencedSopUids"]} == session.source_sop_uids
    shown = {t["text"].strip(): t["shown"] for t in session.result["shownTexts"]}
    for ds in segs:
        [source_uid] = ds["referencedSopUids"]
        said = "outside domain" in ds["description"]
        assert said == (source_uid in flagged), ds
        # ... on screen: the study browser cuts the description after ~23 characters, so the
        # view and the caveat come first (screenshot 04-seg)
        assert ds["description"] in shown, ds["description"]
        assert ("outside domain" in shown[ds["description"]]) == said, shown[ds["description"]]

"""The Secondary Capture overlay: a reduced, labelled picture of each view with the heatmap and the
findings burned in, clean for dciodvfy (pixelmed has no rules for the SC IOD, see the last test)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pipelines.findings import find_findings
from pipelines.overlay import LABEL_COLOUR, MARK_COLOUR, build_overlay, render_overlay
from pipelines.results import ModelIdentity, OutputSpec
from pipelines.scoring import score_views, write_outputs
from pipelines.seg import read_seg_regions
from tests.support.dciodvfy import assert_dciodvfy_clean, to_bytes
from tests.support.pixelmed import pixelmed_report
from tests.support.settings import make_settings
from tests.support.spooled import spooled_views
from tools.stack.make_study import make_study

MODEL = ModelIdentity("mias-baseline", "0.1.0", operating_point=0.5)
SPEC = OutputSpec(9905, "AI overlay", software_version="9.9.9")
ROWS, COLS = 1200, 960


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, np.ndarray, np.ndarray]:
    [path] = make_study(tmp_path_factory.mktemp("study"), views=["R-MLO"], rows=ROWS, cols=COLS,
                        seed=31)
    source = dcmread(path)
    pixels = source.pixel_array.astype(np.float32)
    del source.PixelData
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    heatmap = np.exp(-((yy - 700) ** 2 + (xx - 600) ** 2) / (2 * 60.0**2)).astype(np.float32)
    return source, pixels, heatmap


@pytest.fixture(scope="module")
def overlay(view: tuple[Dataset, np.ndarray, np.ndarray]) -> bytes:
    source, pixels, heatmap = view
    return to_bytes(build_overlay(source, pixels, heatmap, find_findings(heatmap, 0.5), MODEL,
                                  SPEC, max_side_px=600))


def _near(picture: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(np.abs(picture.astype(int) - np.array(colour)) <= 40, axis=-1)


def test_picture_is_reduced_tinted_marked_and_labelled(
    view: tuple[Dataset, np.ndarray, np.ndarray]
) -> None:
    _, pixels, heatmap = view
    findings = find_findings(heatmap, 0.5)
    assert len(findings) == 1
    picture = render_overlay(pixels, heatmap, findings, max_side_px=600)
    assert picture.shape == (600, 480, 3) and picture.dtype == np.uint8  # same aspect as 1200 x 960
    scale = 600 / ROWS
    peak = picture[round(700 * scale), round(600 * scale)]
    assert peak[0] > peak[2] + 60  # the heat tints the peak red
    far = picture[round(200 * scale), round(100 * scale)]
    assert abs(int(far[0]) - int(far[2])) <= 2  # grey where the map is low: no tint
    marks = _near(picture, MARK_COLOUR)
    rows, cols = np.nonzero(marks)
    first_col, first_row, last_col, last_row = findings[0].bounding_box
    assert rows.size > 0
    assert abs(np.median(rows) / scale - (first_row + last_row) / 2) < 60  # around the finding
    label = _near(picture[:40, :], LABEL_COLOUR)
    assert label.sum() > 100  # the burned-in label, top left


def test_without_findings_there_is_no_mark(view: tuple[Dataset, np.ndarray, np.ndarray]) -> None:
    _, pixels, heatmap = view
    picture = render_overlay(pixels, heatmap * 0.4, (), max_side_px=600)
    assert not _near(picture[60:, :], MARK_COLOUR).any()


def test_a_view_outside_the_domain_says_so_under_the_label(
    view: tuple[Dataset, np.ndarray, np.ndarray]
) -> None:
    source, pixels, heatmap = view
    caveat = "R-MLO: outside the model's declared domain (pixel size, view)"
    plain = render_overlay(pixels, heatmap, (), max_side_px=600)
    noted = render_overlay(pixels, heatmap, (), max_side_px=600, notes=[caveat])
    label_rows = np.nonzero(_near(plain, LABEL_COLOUR).any(axis=1))[0]
    below = slice(label_rows.max() + 2, label_rows.max() + 120)
    assert not _near(plain[below], LABEL_COLOUR).any()
    text = _near(noted[below], LABEL_COLOUR)
    assert text.sum() > 100  # the caveat, in the label's colour, under it ...
    assert not _near(noted[:, 470:], LABEL_COLOUR).any()  # ... wrapped inside the picture
    np.testing.assert_array_equal(noted[200:], plain[200:])  # the image below is untouched
    sc = build_overlay(source, pixels, heatmap, (), MODEL, SPEC, 600, caveat)
    assert sc.DerivationDescription.endswith(f"{caveat}.")
    assert np.array_equal(sc.pixel_array, noted)


def test_small_image_is_not_enlarged(view: tuple[Dataset, np.ndarray, np.ndarray]) -> None:
    _, pixels, heatmap = view
    assert render_overlay(pixels, heatmap, (), max_side_px=4096).shape == (ROWS, COLS, 3)
    with pytest.raises(ValueError, match="heatmap shape"):
        render_overlay(pixels, heatmap[:-1], (), max_side_px=600)


@pytest.mark.requires_bin("dciodvfy")
def test_secondary_capture_header_and_dciodvfy(
    view: tuple[Dataset, np.ndarray, np.ndarray], overlay: bytes, tmp_path: Path
) -> None:
    source = view[0]
    sc = dcmread(io.BytesIO(overlay))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == (600, 480, 3)
    assert sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == "AI overlay - research use only"
    assert "research use only" in sc.DerivationDescription.lower()
    assert sc.ContributingEquipmentSequence[0].ManufacturerModelName == MODEL.name
    assert sc.SoftwareVersions == "9.9.9"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.Laterality == source.ImageLaterality  # series level, as highdicom writes it
    assert [float(v) for v in sc.NominalScannedPixelSpacing] == pytest.approx(
        [float(v) * ROWS / 600 for v in source.PixelSpacing])
    assert_dciodvfy_clean(overlay, tmp_path / "sc.dcm", set())


def test_uids_are_deterministic(view: tuple[Dataset, np.ndarray, np.ndarray]) -> None:
    source, pixels, heatmap = view
    first = build_overlay(source, pixels, heatmap, (), MODEL, SPEC, 300)
    again = build_overlay(source, pixels, heatmap * 0.5, (), MODEL, SPEC, 300)
    newer = build_overlay(source, pixels, heatmap, (), ModelIdentity("m", "2", 0.5), SPEC, 300)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                               again.SeriesInstanceUID)
    assert first.SOPInstanceUID != newer.SOPInstanceUID


@pytest.mark.requires_bin("java")
def test_pixelmed_has_no_rules_for_secondary_capture(overlay: bytes, tmp_path: Path) -> None:
    """pixelmed's DicomInstanceValidator (Debian's pixelmed-apps) only knows SEG, the enhanced
    and legacy-converted CT/MR, MR Spectroscopy and Raw Data IODs: on a Secondary Capture it
    checks nothing and says so. dciodvfy is then the one judge of the overlay (above). If a
    pixelmed upgrade learns the SC IOD this test fails: assert_pixelmed_clean belongs here then."""
    path = tmp_path / "sc.dcm"
    path.write_bytes(overlay)
    report = pixelmed_report(path)
    assert report.errors == ("IOD (SOP Class) unrecognized",), report.output
    assert report.warnings == ()


@dataclass(frozen=True)
class _Prediction:
    probability: float
    heatmap: np.ndarray


class _BlobInTheBreast:
    """A stand-in model: one suspicious blob in the model-oriented image, a fixed probability."""

    identity = MODEL
    last_timings_s: dict[str, float] = {}

    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        out = []
        for image in images:
            rows, cols = image.shape
            yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
            # Near the chest wall (left in the model's orientation), upper half.
            blob = np.exp(-((yy - rows / 3) ** 2 + (xx - cols / 5) ** 2) / (2 * (rows / 12) ** 2))
            out.append(_Prediction(0.7, blob.astype(np.float32)))
        return out


def test_write_outputs_writes_the_objects_each_setting_asks_for(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", views=["R-CC", "L-CC"], rows=240, cols=192, seed=32)
    views = spooled_views(tmp_path, paths)
    study_uid = str(views[0].header.StudyInstanceUID)
    result, heatmaps = score_views(views, _BlobInTheBreast(), study_uid)

    default = write_outputs(make_settings(tmp_path / "a"), views, result, heatmaps, MODEL,
                            tmp_path / "default")
    heatmap_kinds = ("seg", "sc")  # the SRs are other tests' business
    # By default one binary SEG per scored image, no overlay.
    assert sorted(o.kind for o in default if o.kind in heatmap_kinds) == ["seg", "seg"]
    segs = [dcmread(tmp_path / "default" / Path(o.file).name) for o in default if o.kind == "seg"]
    assert {s.SegmentationType for s in segs} == {"BINARY"}
    assert all(s.SeriesNumber == 9902 for s in segs)

    everything = write_outputs(
        make_settings(tmp_path / "b", outputs={"seg": {"kind": "both"}, "sc": {"enabled": True}}),
        views, result, heatmaps, MODEL, tmp_path / "everything")
    kinds = sorted(o.kind for o in everything if o.kind in heatmap_kinds)
    assert kinds == ["sc", "sc", "seg", "seg", "seg", "seg"]
    written = {Path(o.file).name: dcmread(tmp_path / "everything" / Path(o.file).name)
               for o in everything if o.kind in heatmap_kinds}
    types = sorted(d.SegmentationType for d in written.values() if d.Modality == "SEG")
    assert types == ["BINARY", "BINARY", "FRACTIONAL", "FRACTIONAL"]
    assert {d.SeriesNumber for d in written.values() if d.get("SegmentationType") == "FRACTIONAL"
            } == {9904}
    # The overlay is in the stored image's orientation: its tint sits where the binary SEG's
    # region is (the model saw the image flipped; the picture must not be).
    for view in views:
        key = view.entry.view_key
        [sc] = [d for n, d in written.items() if n.startswith("sc-") and key in n]
        [seg] = [d for n, d in written.items() if n.startswith("seg-") and "map" not in n
                 and key in n]
        assert sc.SeriesNumber == 9905
        region = read_seg_regions(seg)
        assert region.any()
        picture = sc.pixel_array.astype(int)
        redness = picture[..., 0] - picture[..., 1]  # the heat is red; grey and the label are not
        row, col = np.unravel_index(np.argmax(redness), redness.shape)
        scale = picture.shape[0] / region.shape[0]
        rows, cols = np.nonzero(region)
        assert abs(row / scale - rows.mean()) < 20 and abs(col / scale - cols.mean()) < 20, key
        # ... and so is the grey image under it (these views are small: not reduced).
        stored = dcmread(view.path).pixel_array.astype(float)
        untinted = (picture[..., 0] == picture[..., 2]) & (np.arange(len(picture)) > 40)[:, None]
        grey = picture[..., 2][untinted]
        same = np.corrcoef(grey, stored[untinted])[0, 1]
        mirrored = np.corrcoef(grey, stored[:, ::-1][untinted])[0, 1]
        assert same > 0.9 and same > mirrored + 0.2, (key, same, mirrored)


def test_write_outputs_marks_the_views_outside_the_domain_in_each_object(tmp_path: Path) -> None:
    """The worker's outside_domain flags reach every object a viewer lists per view: the SEGs'
    series descriptions and the overlay's burned-in caveat (the SRs' sentences: test_sr)."""
    paths = make_study(tmp_path / "study", views=["R-CC", "L-CC"], rows=240, cols=192, seed=33)
    views = spooled_views(tmp_path, paths)
    result, heatmaps = score_views(views, _BlobInTheBreast(), str(views[0].header.StudyInstanceUID))
    flagged = next(v for v in views if v.entry.view_key == "L-CC")
    outputs = write_outputs(
        make_settings(tmp_path / "s", outputs={"seg": {"kind": "both"}, "sc": {"enabled": True}}),
        views, result, heatmaps, MODEL, tmp_path / "out",
        outside_domain={flagged.entry.sop_uid: ["outside_domain:pixel_spacing",
                                                "outside_domain:view"]})
    written = [dcmread(tmp_path / "out" / Path(o.file).name) for o in outputs
               if o.kind in ("seg", "sc")]
    for ds in written:
        source = (ds.SourceImageSequence[0] if ds.Modality == "OT"  # the overlay
                  else ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0])
        is_flagged = source.ReferencedSOPInstanceUID == flagged.entry.sop_uid
        if ds.Modality == "SEG":
            key = "L-CC outside domain:" if is_flagged else "R-CC:"
            assert ds.SeriesDescription.startswith(key), ds.SeriesDescription
        else:
            said = "L-CC: outside the model's declared domain (pixel size, view)."
            assert (said in ds.DerivationDescription) == is_flagged, ds.DerivationDescription
    assert sorted(ds.Modality for ds in written) == ["OT", "OT", "SEG", "SEG", "SEG", "SEG"]

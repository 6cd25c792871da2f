"""Input-quality flags (pipelines/quality.py) on synthetic DICOM, through the worker's decode step
and into the run record; records written before the flags existed still load."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node import metrics
from node.runs import InputDescription, InstanceEntry, RunRecord
from node.vocabulary import MG_FOR_PRESENTATION, MG_FOR_PROCESSING
from pipelines.quality import contrast_fraction, entry_flags, image_flags, merge_flags
from pipelines.scoring import _describe_inputs
from pipelines.study import SelectedView, decode_view
from tools.stack.make_study import make_study


def _entry(path: Path, **changes: str) -> InstanceEntry:
    ds = dcmread(path, stop_before_pixels=True)
    entry = InstanceEntry(
        sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        laterality=str(ds.ImageLaterality), view=str(ds.ViewPosition), file=path.name,
        size_bytes=path.stat().st_size, received_at=1.0, association_id="a", calling_ae="MG")
    return replace(entry, **changes)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), rows=256, cols=208, seed=4)


def _modified(path: Path, out: Path, change: object) -> Path:
    ds = dcmread(path)
    change(ds)  # type: ignore[operator]
    ds.save_as(out, enforce_file_format=True)
    return out


def _flags(path: Path) -> tuple[str, ...]:
    return decode_view(SelectedView(_entry(path), path)).quality_flags


def test_a_clean_synthetic_image_has_no_flag(study: list[Path]) -> None:
    assert all(_flags(path) == () for path in study)
    assert entry_flags(_entry(study[0])) == ()


def test_implant_from_the_attribute_or_the_view_modifier(study: list[Path], tmp_path: Path
                                                         ) -> None:
    def implant_yes(ds: Dataset) -> None:
        ds.BreastImplantPresent = "YES"

    def implant_displaced(ds: Dataset) -> None:
        modifier = Dataset()
        modifier.CodeValue, modifier.CodingSchemeDesignator = "399209000", "SCT"
        modifier.CodeMeaning = "Implant Displaced"
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([modifier])

    assert _flags(_modified(study[0], tmp_path / "yes.dcm", implant_yes)) == ("implant_present",)
    assert _flags(_modified(study[1], tmp_path / "id.dcm", implant_displaced)) == (
        "implant_present",)


def test_wrong_body_part_and_low_contrast(study: list[Path], tmp_path: Path) -> None:
    def chest(ds: Dataset) -> None:
        ds.BodyPartExamined = "CHEST"

    def flat(ds: Dataset) -> None:  # the picture squeezed into 20 grey levels of 4096
        pixels = ds.pixel_array.astype(np.float64)
        squeezed = 1000 + 20 * (pixels - pixels.min()) / (pixels.max() - pixels.min())
        ds.PixelData = squeezed.astype(np.uint16).tobytes()

    assert _flags(_modified(study[2], tmp_path / "chest.dcm", chest)) == ("wrong_body_part",)
    assert _flags(_modified(study[3], tmp_path / "flat.dcm", flat)) == ("low_contrast",)
    assert contrast_fraction(np.zeros((64, 64)), 12) == 0.0  # a blank image
    header = dcmread(study[3], stop_before_pixels=True)
    assert image_flags(header, np.full((64, 64), 7.0), 0.01) == ("low_contrast",)


def test_manifest_flags_view_laterality_and_for_processing(study: list[Path]) -> None:
    assert entry_flags(_entry(study[0], view="", laterality="")) == (
        "view_missing", "laterality_missing")
    assert entry_flags(_entry(study[0], sop_class_uid=MG_FOR_PROCESSING)) == ("for_processing",)
    assert entry_flags(_entry(study[0], sop_class_uid=MG_FOR_PRESENTATION)) == ()
    assert merge_flags(["low_contrast"], ["view_missing", "low_contrast"]) == (
        "view_missing", "low_contrast")


def test_flags_reach_the_record_and_the_counter(study: list[Path], tmp_path: Path) -> None:
    def implant_yes(ds: Dataset) -> None:
        ds.BreastImplantPresent = "YES"

    implant = _modified(study[0], tmp_path / "implant.dcm", implant_yes)
    decoded = decode_view(SelectedView(_entry(implant), implant))
    viewless = _entry(study[1], view="")
    inputs = _describe_inputs([decoded.entry, viewless], [decoded], [])
    assert [i.quality_flags for i in inputs] == [("implant_present",), ("view_missing",)]
    record = RunRecord(run_id="r", study_uid="1.2.3", state="done", inputs=inputs)
    dumped = record.model_dump(mode="json")
    assert dumped["inputs"][0]["quality_flags"] == ["implant_present"]
    assert RunRecord.model_validate(dumped) == record
    before = metrics.INPUT_QUALITY_FLAGS.labels(flag="implant_present")._value.get()
    metrics.observe_run(record, metrics.RunSource("MG", "V"))
    assert metrics.INPUT_QUALITY_FLAGS.labels(flag="implant_present")._value.get() == before + 1


def test_records_without_flags_still_load(study: list[Path]) -> None:
    old = InputDescription.of(_entry(study[0]), scored=True, reason=None).model_dump(mode="json")
    assert "quality_flags" not in old  # nothing written when an image has no flag
    loaded = InputDescription.model_validate(old)
    assert loaded.quality_flags is None


# ----------------------------------------------------------------------------- declared domain

SHIPPED_METADATA = Path(__file__).resolve().parents[2] / "models" / "mias-baseline" / "metadata.json"


def _study_image(path: Path, out: Path, view: str, spacing_mm: float, rows_cols: tuple[int, int]
                 ) -> Path:
    """A synthetic view turned into another view position and pixel spacing (FFDM-like or
    MIAS-like)."""
    def change(ds: Dataset) -> None:
        ds.ViewPosition = view
        ds.PixelSpacing = [f"{spacing_mm:g}", f"{spacing_mm:g}"]
        ds.ImagerPixelSpacing = [f"{spacing_mm * 1.1:g}", f"{spacing_mm * 1.1:g}"]
        assert (int(ds.Rows), int(ds.Columns)) == rows_cols

    return _modified(path, out, change)


def test_the_shipped_bundle_declares_a_mias_domain() -> None:
    import json

    from pipelines.quality import Domain

    domain = Domain.from_metadata(json.loads(SHIPPED_METADATA.read_text()))
    assert domain is not None and domain.modalities == ("MG",) and domain.views == ("MLO",)
    assert domain.pixel_spacing_mm is not None
    low, high = domain.pixel_spacing_mm
    assert low <= 0.2 <= high  # mini-MIAS: 200 µm
    assert domain.presentation_intents == ("FOR PRESENTATION",)


def test_inputs_outside_the_declared_domain_are_flagged_and_logged(
        study: list[Path], tmp_path: Path) -> None:
    """An FFDM CC at 0.07 mm is outside the shipped bundle's domain (view and pixel size); a
    0.2 mm MLO is not. The flags reach the record's inputs; one warning per view, no PHI."""
    import json

    from structlog.testing import capture_logs

    from pipelines.quality import Domain, domain_flags
    from pipelines.scoring import _outside_domain

    metadata = json.loads(SHIPPED_METADATA.read_text())
    by_view = {dcmread(p, stop_before_pixels=True).ViewPosition: p for p in study}
    ffdm_cc = _study_image(by_view["CC"], tmp_path / "ffdm-cc.dcm", "CC", 0.07, (256, 208))
    film_mlo = _study_image(by_view["MLO"], tmp_path / "film-mlo.dcm", "MLO", 0.2, (256, 208))
    views = [decode_view(SelectedView(_entry(p), p)) for p in (ffdm_cc, film_mlo)]
    with capture_logs() as logs:
        outside = _outside_domain("run-1", views, metadata)
    cc_uid, mlo_uid = (v.entry.sop_uid for v in views)
    assert outside == {cc_uid: ("outside_domain:pixel_spacing", "outside_domain:view")}
    [line] = [entry for entry in logs if entry["event"] == "input_outside_domain"]
    assert line["reasons"] == ["pixel_spacing", "view"] and line["run_id"] == "run-1"
    assert line["scored"] is True  # scoring.outside_domain: score, the default
    assert set(line) <= {"event", "log_level", "run_id", "sop_uid", "view", "reasons", "scored"}
    inputs = _describe_inputs([v.entry for v in views], views, [], outside)
    assert [i.quality_flags for i in inputs] == [
        ("outside_domain:pixel_spacing", "outside_domain:view"), None]
    record = RunRecord(run_id="r", study_uid="1.2.3", state="done", inputs=inputs)
    assert RunRecord.model_validate(record.model_dump(mode="json")) == record
    counter = metrics.INPUT_QUALITY_FLAGS.labels(flag="outside_domain:pixel_spacing")
    before = counter._value.get()
    metrics.observe_run(record, metrics.RunSource("MG", "V"))
    assert counter._value.get() == before + 1

    # The other reasons, on headers alone; no domain declared: nothing flagged.
    domain = Domain.from_metadata(metadata)
    header = dcmread(film_mlo, stop_before_pixels=True)
    assert domain_flags(header, domain) == ()
    header.Modality, header.PhotometricInterpretation = "CR", "RGB"
    header.PresentationIntentType = "FOR PROCESSING"
    del header.PixelSpacing, header.ImagerPixelSpacing
    assert domain_flags(header, domain) == tuple(
        "outside_domain:" + r for r in ("modality", "pixel_spacing_missing", "photometric",
                                        "presentation_intent"))
    assert domain_flags(header, None) == () and Domain.from_metadata({"name": "x"}) is None
    assert merge_flags(["outside_domain:view", "implant_present"]) == (
        "implant_present", "outside_domain:view")

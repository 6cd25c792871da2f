"""node/deid_export.py: the de-identified training export, its pieces and a PHI canary over it.

The runs are finished runs in a spool's done/ folder made from canary DICOM files, with records
written by node/runs.py (tests/support/deid_canary.py); tests/integration/test_training_export.py
does the same through a real node (Redis, serve, worker) and the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from node.cli import main as cli_main
from node.deid_export import (
    KEY_ENV,
    RETAINED,
    Deidentifier,
    ExportError,
    Refused,
    export_training_set,
    load_key,
    read_outcomes,
)
from node.spool import Spool
from node.synthetic import make_study
from pipelines.orientation import orientation_from_tags
from tests.support.deid_canary import (
    ORG_ROOT,
    PATIENT_A,
    PATIENT_B,
    canary_study,
    canary_tokens,
    leaks_in,
    scan_for_canaries,
    source_uids,
    write_done_run,
)
from tests.support.logging_state import logging_restored
from tests.support.settings import write_config
from tools.model.dataset import load_pixels, read_manifest, to_model_orientation

KEY = b"k" * 40
OTHER_KEY = b"o" * 40
DATES = {"a1": "20190314", "a2": "20200402", "b1": "20210909"}
ACCESSIONS = {"a1": "ACCCANARYA1", "a2": "ACCCANARYA2", "b1": "ACCCANARYB1"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Patient A twice (Latin-1, then UTF-8), patient B once with R-CC burned in and L-CC
    without Burned In Annotation."""
    root = tmp_path_factory.mktemp("canary")
    return {
        "a1": canary_study(root / "a1", seed=11, patient=PATIENT_A, accession=ACCESSIONS["a1"],
                           study_date=DATES["a1"], charset="ISO_IR 100"),
        "a2": canary_study(root / "a2", seed=12, patient=PATIENT_A, accession=ACCESSIONS["a2"],
                           study_date=DATES["a2"]),
        "b1": canary_study(root / "b1", seed=13, patient=PATIENT_B, accession=ACCESSIONS["b1"],
                           study_date=DATES["b1"], burned_in={"R-CC": "YES", "L-CC": ""}),
    }


def _tokens(studies: dict[str, list[Path]]) -> list[str]:
    everything = [p for paths in studies.values() for p in paths]
    return canary_tokens([PATIENT_A, PATIENT_B], ACCESSIONS.values(), DATES.values()) + sorted(
        source_uids(everything))


def _by_view(paths: list[Path]) -> dict[str, Path]:
    out = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        out[f"{ds.ImageLaterality}-{ds.ViewPosition}"] = path
    return out


@pytest.fixture(scope="module")
def exported(studies: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path, dict[str, object]]:
    """(spool, out, summary) of one export with outcomes, plus a superseded and an unscored run."""
    root = tmp_path_factory.mktemp("export")
    spool = root / "spool"
    write_done_run(spool, "20260101T000000-a1", studies["a1"])
    write_done_run(spool, "20260101T000001-a2", studies["a2"])
    write_done_run(spool, "20260101T000002-b1", studies["b1"])
    # A study scored twice: only the later run counts. And a run done without scoring.
    write_done_run(spool, "20260101T000003-b1", studies["b1"], exam=0.9)
    write_done_run(spool, "20260101T000004-x", make_study(root / "x", rows=64, cols=52, seed=99),
                   scored=False)
    outcomes = root / "outcomes.csv"
    outcomes.write_text(
        "study_uid,accession_number,label,malignant,laterality,notes\n"
        f"{ORG_ROOT}.11.1,,1,1,L,\n"
        f"{ORG_ROOT}.11.1,,0,0,,\n"
        f",{ACCESSIONS['b1']},0,,,free text\n"
        ",UNKNOWN-ACCESSION,1,0,,\n", encoding="utf-8")
    out = root / "out"
    summary = export_training_set(Spool(spool), out, KEY, read_outcomes(outcomes))
    return spool, out, summary.as_json()


# --- the key -------------------------------------------------------------------------------------
def test_the_key_comes_from_the_environment_or_a_file_and_is_long_enough(tmp_path: Path) -> None:
    assert load_key(None, {KEY_ENV: " " + "x" * 40 + "\n"}) == b"x" * 40
    with pytest.raises(ExportError, match=KEY_ENV):
        load_key(None, {})
    with pytest.raises(ExportError, match="shorter than 32") as short:
        load_key(None, {KEY_ENV: "secret-but-short"})
    assert "secret-but-short" not in str(short.value)
    key_file = tmp_path / "deid.key"
    key_file.write_text("f" * 64 + "\n")
    assert load_key(key_file, {KEY_ENV: "x" * 40}) == b"f" * 64  # the file wins
    with pytest.raises(ExportError, match="key file"):
        load_key(tmp_path / "missing.key", {})


# --- outcomes ------------------------------------------------------------------------------------
def test_outcomes_match_by_study_uid_or_accession_and_by_breast(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text("Study_UID,Accession_Number,Label,Malignant,Laterality\n"
                    "1.2.3,,1,1,R\n1.2.3,,0,,\n,ACC1,,1,\n,ACC2,1,,l\n\n", encoding="utf-8")
    outcomes = read_outcomes(path)
    assert outcomes.rows == 4
    assert outcomes.lookup("1.2.3", "", "R") == outcomes.by_study["1.2.3"]["R"]
    assert (outcomes.lookup("1.2.3", "", "R").label, outcomes.lookup("1.2.3", "", "R").malignant) == (1, 1)
    assert outcomes.lookup("1.2.3", "", "L").label == 0  # the whole-study row
    assert outcomes.lookup("9.9", "ACC1", "L").label == 1  # label defaults to malignant
    assert outcomes.lookup("9.9", "ACC2", "R") is None  # only the left breast has a row
    assert outcomes.lookup("9.9", "ACC2", "L").malignant is None
    assert outcomes.unmatched_studies == 0


@pytest.mark.parametrize(("text", "message"), [
    ("study_uid,label\n1.2.3,YES-ACC-SECRET\n", "line 2: column label must be 0, 1 or empty"),
    ("accession_number,malignant\nACC-SECRET,2\n", "line 2: column malignant"),
    ("study_uid,label\n,1\n", "line 2: neither study_uid nor accession_number"),
    ("study_uid,label,malignant\n1.2,0,1\n", "line 2: malignant 1 with label 0"),
    ("study_uid,label\n1.2,1\n1.2,0\n", "line 3: a second row for the same study and breast"),
    ("study_uid,label,laterality\n1.2,1,B-SECRET\n", "line 2: column laterality"),
    ("patient,label\nACC-SECRET,1\n", "needs a study_uid or an accession_number column"),
    ("study_uid,score\n1.2,0.5\n", "needs a label or a malignant column"),
])
def test_bad_outcomes_name_the_line_and_column_never_the_value(tmp_path: Path, text: str,
                                                               message: str) -> None:
    path = tmp_path / "o.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ExportError, match=message) as error:
        read_outcomes(path)
    assert "SECRET" not in str(error.value)


# --- de-identification of one image ------------------------------------------------------------
def test_same_patient_same_pseudonym_shift_and_uids_other_patient_not(
        studies: dict[str, list[Path]]) -> None:
    deid = Deidentifier(KEY)
    a1, a2, b1 = (deid.deidentify(dcmread(_by_view(studies[k])["R-MLO"]))
                  for k in ("a1", "a2", "b1"))
    assert a1.PatientID == a2.PatientID and a1.PatientName == a2.PatientName
    assert a1.PatientID != b1.PatientID and a1.PatientName != b1.PatientName
    assert a1.StudyInstanceUID != a2.StudyInstanceUID
    # Dates move back by one shift per patient: the interval between A's studies is kept.
    from datetime import date

    def day(text: str) -> date:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))

    shift = day(DATES["a1"]) - day(a1.StudyDate)
    assert 62 <= shift.days <= 730
    assert day(DATES["a2"]) - day(a2.StudyDate) == shift
    assert day(DATES["b1"]) - day(b1.StudyDate) != shift  # independent per patient (this key)
    # The same source UID gives the same new UID, in another export with the same key too.
    again = Deidentifier(KEY).deidentify(dcmread(_by_view(studies["a1"])["R-MLO"]))
    assert (again.SOPInstanceUID, again.StudyInstanceUID, again.PatientID, again.StudyDate) == (
        a1.SOPInstanceUID, a1.StudyInstanceUID, a1.PatientID, a1.StudyDate)
    second = Deidentifier(KEY).deidentify(dcmread(_by_view(studies["a1"])["L-CC"]))
    assert second.StudyInstanceUID == a1.StudyInstanceUID
    assert second.SOPInstanceUID != a1.SOPInstanceUID
    other = Deidentifier(OTHER_KEY).deidentify(dcmread(_by_view(studies["a1"])["R-MLO"]))
    assert other.PatientID != a1.PatientID and other.SOPInstanceUID != a1.SOPInstanceUID


def test_only_the_retained_attributes_stay_and_the_profile_is_declared(
        studies: dict[str, list[Path]]) -> None:
    clean = Deidentifier(KEY).deidentify(dcmread(studies["a1"][0]))
    declared = {"PatientIdentityRemoved", "LongitudinalTemporalInformationModified",
                "DeidentificationMethod", "DeidentificationMethodCodeSequence"}
    assert {e.keyword for e in clean} <= RETAINED | declared
    assert not any(e.tag.is_private for e in clean)
    assert clean.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in clean.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert (clean.PatientBirthDate, clean.PatientSex, clean.ReferringPhysicianName) == ("", "", "")
    assert "DeviceSerialNumber" not in clean and "OperatorsName" not in clean
    assert "InstitutionName" not in clean and "RequestAttributesSequence" not in clean
    assert not str(clean.SOPInstanceUID).startswith(ORG_ROOT)
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in clean.file_meta
    # The picture and what orients it are kept.
    source = dcmread(studies["a1"][0])
    assert np.array_equal(clean.pixel_array, source.pixel_array)
    assert (clean.ImageLaterality, clean.ViewPosition, list(clean.PatientOrientation)) == (
        source.ImageLaterality, source.ViewPosition, list(source.PatientOrientation))


def test_burned_in_annotation_yes_or_missing_is_refused(studies: dict[str, list[Path]]) -> None:
    views = _by_view(studies["b1"])
    deid = Deidentifier(KEY)
    with pytest.raises(Refused, match="burned_in_annotation_yes"):
        deid.deidentify(dcmread(views["R-CC"]))
    with pytest.raises(Refused, match="burned_in_annotation_missing"):
        deid.deidentify(dcmread(views["L-CC"]))
    assert deid.deidentify(dcmread(views["R-MLO"])).BurnedInAnnotation == "NO"


def test_compressed_pixels_are_written_decoded(tmp_path: Path) -> None:
    """No codestream of the source travels (its comments and markers could hold text)."""
    path = make_study(tmp_path, views=("L-CC",), rows=64, cols=52, transfer_syntax="j2k")[0]
    source = dcmread(path)
    assert source.file_meta.TransferSyntaxUID == JPEG2000Lossless
    clean = Deidentifier(KEY).deidentify(dcmread(path))
    clean.save_as(tmp_path / "clean.dcm", enforce_file_format=True)
    reread = dcmread(tmp_path / "clean.dcm")
    assert not reread.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(reread.pixel_array, source.pixel_array)


# --- the export ----------------------------------------------------------------------------------
def test_export_counts_labels_scores_and_groups(
        exported: tuple[Path, Path, dict[str, object]]) -> None:
    _, out, summary = exported
    assert summary["runs_in_done"] == 5
    assert summary["skipped_runs"] == {"not_scored": 1, "older_run_of_study": 1}
    assert summary["refused_images"] == {"burned_in_annotation_missing": 1,
                                         "burned_in_annotation_yes": 1}
    assert (summary["studies_exported"], summary["images_exported"], summary["patients"]) == (3, 10, 2)
    assert (summary["labelled_images"], summary["unlabelled_images"]) == (6, 4)
    assert (summary["outcome_rows"], summary["outcome_studies_unmatched"]) == (4, 1)
    lines = [json.loads(t) for t in (out / "labelled.jsonl").read_text().splitlines()]
    unlabelled = [json.loads(t) for t in (out / "unlabelled.jsonl").read_text().splitlines()]
    assert {line["label"] for line in unlabelled} == {None}
    assert len({line["study"] for line in unlabelled}) == 1  # A's second study: no outcome
    groups = {line["study"]: line["group"] for line in lines + unlabelled}
    assert len(set(groups.values())) == 2  # A's two studies, one woman
    by_study: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_study.setdefault(str(line["study"]), []).append(line)
    a1, b1 = sorted(by_study.values(), key=len, reverse=True)
    assert {(x["laterality"], x["label"], x["malignant"]) for x in a1} == {("L", 1, 1), ("R", 0, 0)}
    assert {(x["laterality"], x["view"], x["label"]) for x in b1} == {("L", "MLO", 0), ("R", "MLO", 0)}
    assert {x["node_exam_score"] for x in b1} == {0.9}  # the later run's scores
    assert {x["node_model"] for x in a1} == {"canary-model 1"}
    assert all(isinstance(x["node_view_score"], float) for x in lines + unlabelled)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "images", "labelled.jsonl",
                                                     "unlabelled.jsonl"]
    assert len(list((out / "images").iterdir())) == 10


def test_the_manifest_loads_with_the_model_tools_in_the_worker_orientation(
        exported: tuple[Path, Path, dict[str, object]]) -> None:
    _, out, _ = exported
    records = read_manifest(out / "labelled.jsonl")
    assert len(records) == 6 and {r.laterality for r in records} == {"L", "R"}
    for record in records:
        ds = dcmread(record.image)
        assert record.id == ds.SOPInstanceUID and record.group == ds.PatientID
        pixels = load_pixels(record)
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.float32
        # The manifest's chest_wall/flip_rows turn the image exactly as the worker turns it.
        worker = orientation_from_tags(record.laterality, record.view, list(ds.PatientOrientation))
        assert np.array_equal(to_model_orientation(pixels, record), worker.apply(pixels))
        # Chest wall on the left after turning: more tissue in the left half (synthetic breasts).
        turned = to_model_orientation(pixels, record)
        assert turned[:, : turned.shape[1] // 2].mean() > turned[:, turned.shape[1] // 2:].mean()


def test_no_canary_in_anything_the_export_wrote(
        studies: dict[str, list[Path]], exported: tuple[Path, Path, dict[str, object]]) -> None:
    spool, out, summary = exported
    tokens = _tokens(studies)
    leaks, searched = scan_for_canaries(out, tokens)
    assert leaks == []
    assert len(searched) == 13  # 10 images, 2 manifests, export.json: nothing else
    assert leaks_in(json.dumps(summary).encode(), "summary", tokens) == []
    # The detector works: the spool's source files are full of canaries.
    found, _ = scan_for_canaries(spool / "done", tokens)
    assert {t for t in tokens if any(f.startswith(repr(t)) for f in found)} == set(tokens)


def test_since_the_output_folder_and_the_command_line(
        studies: dict[str, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "node.yaml")
    spool = tmp_path / "spool"
    write_done_run(spool, "20260101T000000-a1", studies["a1"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ExportError, match="new or empty"):
        export_training_set(Spool(spool), tmp_path / "busy", KEY)
    future = Spool(spool).finished_at("done", "20260101T000000-a1") + 3 * 86400
    none = export_training_set(Spool(spool), tmp_path / "old", KEY, since_days=1, now=future)
    assert (none.images_exported, dict(none.skipped_runs)) == (0, {"older_than_since": 1})

    monkeypatch.delenv(KEY_ENV, raising=False)
    argv = ["export-training", "--config", str(config), "--out", str(tmp_path / "cli")]
    with logging_restored():
        assert cli_main(argv) == 2
        assert KEY_ENV in capsys.readouterr().err
        monkeypatch.setenv(KEY_ENV, "z" * 48)
        assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0])["images_exported"] == 4
    audit = [json.loads(t) for t in (spool / "audit.jsonl").read_text().splitlines()]
    assert [a["event"] for a in audit] == ["training_set_exported"]
    assert audit[0]["images_exported"] == 4 and audit[0]["patients"] == 1
    tokens = _tokens(studies)
    assert scan_for_canaries(tmp_path / "cli", tokens)[0] == []
    written = (spool / "audit.jsonl").read_bytes() + (captured.out + captured.err).encode()
    assert leaks_in(written, "audit and output", tokens) == []
    assert b"z" * 48 not in written


@pytest.mark.slow
def test_the_export_trains_one_epoch(tmp_path: Path) -> None:
    """tools/model/train.py reads the exported DICOM set: six women, half with an outcome of 1."""
    from tools.model.train import main as train_main

    spool = tmp_path / "spool"
    rows = ["accession_number,label,malignant"]
    for woman in range(6):
        sick = woman % 2 == 1
        paths = make_study(tmp_path / f"w{woman}", rows=64, cols=52, seed=100 + woman,
                           patient_id=f"TRAIN{woman}", lesions=("L-CC", "L-MLO") if sick else ())
        write_done_run(spool, f"20260101T00000{woman}-w", paths)
        rows.append(f"ACC{100 + woman:06d},{int(sick)},{int(sick)}")
    (tmp_path / "outcomes.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    summary = export_training_set(Spool(spool), out, KEY, read_outcomes(tmp_path / "outcomes.csv"))
    assert (summary.labelled_images, summary.patients) == (24, 6)
    trained = tmp_path / "trained"
    assert train_main(["--manifest", str(out / "labelled.jsonl"), "--out", str(trained),
                       "--arch", "resnet18", "--split", "50/25/25", "--epochs", "1",
                       "--min-epochs", "1", "--size", "32", "--batch-size", "8",
                       "--threads", "1", "--device", "cpu"]) == 0
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["data"]["images"] == 24 and metrics["data"]["groups"] == 6
    assert metrics["data"]["abnormal"] == 12 and metrics["data"]["malignant"] == 12
    predictions = [json.loads(t) for t in (trained / "predictions.jsonl").read_text().splitlines()]
    assert {p["group"] for p in predictions} == {r.group for r in read_manifest(out / "labelled.jsonl")}

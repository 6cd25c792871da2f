"""PHI canaries for the de-identified export (`mammo-node export-training`), for tests only.

`canary_study` writes a synthetic MG study whose every PHI-bearing attribute holds a recognisable
value (names, IDs, birth date, accession, institution, physicians, operators, study ID, device
serial, station, dates, UIDs under a made-up organisation root, free text, a request sequence,
private tags with text, the file meta's source AE title), in the character set asked for.
`scan_for_canaries` searches every byte of every file under a folder for every canary as text,
in UTF-8 and in Latin-1 (the DICOM encodings the studies use), case-insensitively, plus the
source UIDs. 12-bit pixel data cannot fake a hit: every other byte of it is below 0x10.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence

from node.runs import InputDescription, ModelRef, RunRecord, Scores, read_manifest, write_record
from node.synthetic import make_study
from tests.support.spooled import spool_datasets

ORG_ROOT = "1.3.6.1.4.1.99999.7741"  # a made-up organisation root: no output UID may carry it


@dataclass(frozen=True)
class CanaryPatient:
    name: str
    patient_id: str
    family: str  # the distinctive part of the name (what the scan looks for)


PATIENT_A = CanaryPatient("ZEBRAMÜLLER^ÅSA", "PID-CANARY-4417", "ZEBRAMÜLLER")
PATIENT_B = CanaryPatient("QUAGGAWEISS^BEA", "PID-CANARY-5528", "QUAGGAWEISS")
BIRTH_DATE = "19310517"

# Every value below is put in each canary study; with the patients' names, IDs, the accession
# numbers and study dates passed to `canary_study`, none may be found in anything exported.
FIXED: dict[str, str] = {
    "IssuerOfPatientID": "ISSUERCANARY",
    "PatientAddress": "7 Wombat Street Canaryville",
    "PatientTelephoneNumbers": "5550199-CANARY",
    "OtherPatientIDs": "OTHERPIDCANARY",
    "InstitutionName": "Narwhal Canary Clinic",
    "InstitutionAddress": "12 Quokka Lane",
    "InstitutionalDepartmentName": "GIRAFFEWING",
    "ReferringPhysicianName": "OKAPIREFER^DOC",
    "PerformingPhysicianName": "IBEXPERFORM^DOC",
    "OperatorsName": "TAPIROPERATOR^RAD",
    "StudyID": "STUDYCANARY9",
    "DeviceSerialNumber": "SERIALCANARY314",
    "StationName": "STATIONCANARY",
    "StudyDescription": "Screening WALRUSDESC",
    "SeriesDescription": "Series LEMURDESC",
    "ProtocolName": "PROTOCOLCANARY",
    "ImageComments": "comment MARMOSETNOTE",
}
REQUEST_ID = "REQCANARY77"
PRIVATE_CREATOR = "CANARY CORP PRIVATE"
PRIVATE_TEXT = "PANGOLINPRIVATE note"
SOURCE_AE = "MODALITYCANARY"


def _distinctive(value: str) -> str:
    """The part of a value a scan looks for: its longest word (PN components split)."""
    return max(value.replace("^", " ").split(), key=len)


def canary_tokens(patients: Iterable[CanaryPatient], accessions: Iterable[str],
                  study_dates: Iterable[str]) -> list[str]:
    tokens = [_distinctive(v) for v in FIXED.values()]
    tokens += [REQUEST_ID, PRIVATE_CREATOR, _distinctive(PRIVATE_TEXT), SOURCE_AE, BIRTH_DATE,
               ORG_ROOT]
    for patient in patients:
        tokens += [patient.family, patient.patient_id]
    tokens += [*accessions, *study_dates]
    return sorted(set(tokens))


def canary_study(folder: Path, *, seed: int, patient: CanaryPatient, accession: str,
                 study_date: str, charset: str = "ISO_IR 192", rows: int = 128, cols: int = 104,
                 burned_in: dict[str, str] | None = None) -> list[Path]:
    """A 4-view study full of canaries. `charset`: "ISO_IR 192" (UTF-8) or "ISO_IR 100"
    (Latin-1). `burned_in`: Burned In Annotation by view key ("" removes it); default NO."""
    paths = make_study(folder, rows=rows, cols=cols, seed=seed, patient_name=patient.name,
                       patient_id=patient.patient_id, accession=accession)
    study_uid = f"{ORG_ROOT}.{seed}.1"
    for index, path in enumerate(paths, start=1):
        ds = dcmread(path)
        view_key = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient.name
        ds.PatientBirthDate = BIRTH_DATE
        for keyword, value in FIXED.items():
            setattr(ds, keyword, value)
        for keyword in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate",
                        "InstanceCreationDate"):
            setattr(ds, keyword, study_date)
        ds.AcquisitionDateTime = f"{study_date}101112"
        ds.StudyTime = "101112"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = f"{ORG_ROOT}.{seed}.2.{index}"
        ds.SOPInstanceUID = f"{ORG_ROOT}.{seed}.3.{index}"
        ds.FrameOfReferenceUID = f"{ORG_ROOT}.{seed}.4"
        request = Dataset()
        request.RequestedProcedureID = REQUEST_ID
        request.ScheduledProcedureStepID = REQUEST_ID
        ds.RequestAttributesSequence = DicomSequence([request])
        block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", PRIVATE_TEXT)
        block.add_new(0x02, "UN", PRIVATE_TEXT.encode("ascii"))
        value = (burned_in or {}).get(view_key, "NO")
        if value:
            ds.BurnedInAnnotation = value
        elif "BurnedInAnnotation" in ds:
            del ds.BurnedInAnnotation
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.SourceApplicationEntityTitle = SOURCE_AE
        ds.save_as(path, enforce_file_format=True)
    return paths


def source_uids(paths: Iterable[Path]) -> set[str]:
    """Every instance UID in the source files (class and transfer syntax UIDs excluded)."""
    found: set[str] = set()
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "FrameOfReferenceUID"):
            found.add(str(ds[keyword].value))
    return found


def leaks_in(blob: bytes, where: str, tokens: Iterable[str]) -> list[str]:
    """Each token found in `blob` as UTF-8 or Latin-1 text, case-insensitively."""
    haystack = blob.upper()
    found = []
    for token in tokens:
        for encoding in ("utf-8", "latin-1"):
            try:
                needle = token.upper().encode(encoding)
            except UnicodeEncodeError:
                continue
            if needle in haystack:
                found.append(f"{token!r} ({encoding}) in {where}")
                break
    return found


def scan_for_canaries(folder: Path, tokens: Sequence[str]) -> tuple[list[str], list[Path]]:
    """(leaks, files searched) over every file under `folder`."""
    leaks: list[str] = []
    searched: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            searched.append(path)
            leaks += leaks_in(path.read_bytes(), str(path.relative_to(folder)), tokens)
    return leaks, searched


def write_done_run(spool_dir: Path, run_id: str, paths: Sequence[Path], exam: float = 0.4,
                   scored: bool = True) -> Path:
    """A finished run in `spool_dir/done/` from DICOM files, with a record written by
    node/runs.py: every image scored (view score 0.1 x its position), or none (`not_scored`)."""
    datasets = [dcmread(path) for path in paths]
    (spool_dir / "done").mkdir(parents=True, exist_ok=True)
    run_dir = spool_datasets(spool_dir / "done" / run_id, datasets)
    entries = sorted(read_manifest(run_dir), key=lambda e: e.view_key)
    views = {e.view_key: round(0.1 * (i + 1), 3) for i, e in enumerate(entries)}
    record = RunRecord(
        run_id=run_id, study_uid=entries[0].study_uid, state="done",
        model=ModelRef(name="canary-model", version="1"), attempts=1,
        inputs=tuple(InputDescription.of(e, scored, None if scored else "test") for e in entries),
        scores=Scores(views=views, breasts={"L": 0.3, "R": 0.6}, exam=exam, operating_point=0.5,
                      suspicious=False) if scored else None,
        not_scored=None if scored else "test",
    )
    write_record(run_dir, record)
    time.sleep(0.01)  # distinct finish times (record mtimes) for runs written in a row
    return run_dir

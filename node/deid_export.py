"""De-identified training sets from scored studies: `mammo-node export-training`.

A site that wants to fine-tune or re-evaluate a model on its own population needs its images,
the node's scores and the outcomes (recall, biopsy, cancer) without the patients' identities.
This module takes the runs in the spool's `done/` folder (read through node/spool.py and
node/runs.py), de-identifies the images the model scored and writes

    OUT/images/<new SOP Instance UID>.dcm   de-identified DICOM, Explicit VR Little Endian
    OUT/labelled.jsonl                      images with an outcome: tools/model/dataset.py's format
    OUT/unlabelled.jsonl                    images without an outcome (label and malignant null)
    OUT/export.json                         counts, method, software versions (no PHI, no key)

De-identification follows DICOM PS3.15 Annex E, Basic Application Level Confidentiality
Profile with the Retain Longitudinal Temporal Information with Modified Dates Option:

- a **retain list** (`RETAINED`): only the attributes a mammography model or its evaluation
  needs (image pixel module, laterality, view, orientation, spacing, exposure, manufacturer and
  model) and the identifying attributes a DICOM file must carry, which are then replaced;
  everything else is removed, private tags, overlays, free text (descriptions, comments,
  protocol names), device serial numbers, station and institution names and operators included;
  code sequences keep their codes only;
- **dicognito** (`dicognito.anonymizer.Anonymizer`, pinned in pyproject.toml) replaces Patient's
  Name, Patient ID, Accession Number and Study ID by pseudonyms, every instance UID by a new one
  (`2.` + 40 digits: no organisation root survives) and shifts every date back by 62 to 730
  days. One Anonymizer per patient, seeded with HMAC-SHA256(site key, issuer + patient ID): the
  same patient gets the same pseudonym, the same date shift and the same new UIDs in every study
  and every export, and two patients get independent shifts. Without the site key (an
  environment variable or a key file, never written anywhere) the pseudonyms cannot be linked
  back, and the export writes no mapping table;
- Patient's Birth Date, Patient's Sex and Referring Physician's Name are emptied (type 2), times
  are dropped (Study Time emptied);
- pixels are decoded and written uncompressed, so no codestream comment or marker segment of
  the source travels; images whose Burned In Annotation is YES, or absent (the DX/MG image
  modules make it type 1), are refused and counted, never exported;
- Patient Identity Removed YES, De-identification Method and its code sequence (DCM 113100,
  113107), Longitudinal Temporal Information Modified MODIFIED are set.

Outcomes come from a CSV with a header: `study_uid` or `accession_number` (either column may be
absent, a row needs one), `label` (1 = an abnormality needing work-up) and/or `malignant`
(0/1; `label` defaults to it), optionally `laterality` (L or R: that breast; empty: the whole
study, for breasts without a row of their own). The CSV holds PHI (accession numbers): errors
name its line and column, never a value.

No PHI in logs, the audit record or error messages: counts, run ids and reasons only. node/
never imports pipelines/ at module level: the orientation rule (pipelines/orientation.py, pure
numpy) is imported inside `export_training_set`.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node.logs import get_logger
from node.runs import InputDescription, RunRecord, read_record, read_superseded
from node.spool import Spool
from node.version import software_version

log = get_logger("node.deid_export")

KEY_ENV = "MAMMO_NODE_DEID_KEY"
MIN_KEY_CHARS = 32
IMAGES_DIR = "images"
MANIFEST_FILE = "labelled.jsonl"
UNLABELLED_FILE = "unlabelled.jsonl"
SUMMARY_FILE = "export.json"

# What the exported files keep (PS3.15 E.1: everything else is removed). The identifying ones
# among them are replaced by dicognito (names, IDs, UIDs, dates) or emptied (`EMPTIED`).
RETAINED: frozenset[str] = frozenset({
    # SOP common, patient, study, series (identifiers replaced by dicognito)
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "ImageType",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "ReferringPhysicianName",
    "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDate", "InstanceNumber",
    "FrameOfReferenceUID", "ContentDate", "AcquisitionDate",
    "Manufacturer", "ManufacturerModelName",
    # mammography image: what the model and its evaluation read
    "PresentationIntentType", "BurnedInAnnotation", "RecognizableVisualFeatures",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    "PatientOrientation", "ImageLaterality", "Laterality", "ViewPosition", "ViewCodeSequence",
    "AnatomicRegionSequence", "BodyPartExamined", "BreastImplantPresent", "PartialView",
    "OrganExposed", "PositionerType", "PositionerPrimaryAngle", "PositionerSecondaryAngle",
    "DetectorType", "DetectorConfiguration", "ImagerPixelSpacing", "PixelSpacing",
    "PixelSpacingCalibrationType", "EstimatedRadiographicMagnificationFactor",
    "DistanceSourceToDetector", "DistanceSourceToPatient", "BodyPartThickness",
    "CompressionForce", "KVP", "Exposure", "ExposureTime", "XRayTubeCurrent",
    "ExposureInuAs", "AnodeTargetMaterial", "FilterMaterial", "FocalSpots",
    "QualityControlImage",
    "PixelIntensityRelationship", "PixelIntensityRelationshipSign",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "PresentationLUTShape",
    "WindowCenter", "WindowWidth", "VOILUTFunction",
    # image pixel module
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "PixelData",
})
EMPTIED: tuple[str, ...] = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyTime")
# Inside the retained code sequences, only the code itself (and the nested modifiers).
CODE_ITEM_KEYS: frozenset[str] = frozenset({
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
    "LongCodeValue", "URNCodeValue", "ViewModifierCodeSequence", "AnatomicRegionModifierSequence",
})
PROFILE_CODES = (codes.DCM.BasicApplicationConfidentialityProfile,
                 codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption)


class ExportError(Exception):
    """A problem with the request (key, output folder, outcomes CSV): exit 2. Never quotes PHI."""


# --- the site key --------------------------------------------------------------------------------
def load_key(key_file: Path | None, environ: Mapping[str, str] | None = None) -> bytes:
    """The site's pseudonymisation key: the key file when given, else `MAMMO_NODE_DEID_KEY`.

    At least `MIN_KEY_CHARS` characters (e.g. `openssl rand -hex 32`). Keep it: the same key
    gives the same pseudonyms, so a later export links to an earlier one; losing it only means
    a new export starts new pseudonyms."""
    environ = os.environ if environ is None else environ
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ExportError(f"key file {key_file}: {error.strerror or 'unreadable'}") from None
        where = f"key file {key_file}"
    else:
        text = environ.get(KEY_ENV, "").strip()
        where = f"environment variable {KEY_ENV}"
        if not text:
            raise ExportError(f"no pseudonymisation key: set {KEY_ENV} or pass --key-file "
                              f"(create one with: openssl rand -hex 32 > deid.key; chmod 600 deid.key)")
    if len(text) < MIN_KEY_CHARS:
        raise ExportError(f"{where}: the key is shorter than {MIN_KEY_CHARS} characters")
    return text.encode("utf-8")


# --- outcomes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    label: int
    malignant: int | None


@dataclass
class Outcomes:
    """Outcome rows by study UID and by accession number, then by breast ("" = whole study)."""

    by_study: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    by_accession: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    rows: int = 0
    _used: set[tuple[str, str]] = field(default_factory=set)

    def lookup(self, study_uid: str, accession: str, laterality: str) -> Outcome | None:
        """The breast's own row, else the study's whole-study row; by study UID first."""
        for kind, table, key in (("study", self.by_study, study_uid),
                                 ("accession", self.by_accession, accession)):
            rows = table.get(key) if key else None
            if not rows:
                continue
            for side in (laterality, ""):
                if side in rows:
                    self._used.add((kind, key))
                    return rows[side]
        return None

    @property
    def unmatched_studies(self) -> int:
        """Studies (CSV keys) that no exported image used."""
        keys = {("study", k) for k in self.by_study} | {("accession", k) for k in self.by_accession}
        return len(keys - self._used)


def _flag(value: str, line: int, column: str) -> int | None:
    text = value.strip()
    if text == "":
        return None
    if text in ("0", "1"):
        return int(text)
    raise ExportError(f"outcomes line {line}: column {column} must be 0, 1 or empty")


def read_outcomes(path: Path) -> Outcomes:
    """The outcomes CSV (see the module docstring); ExportError naming line and column."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as error:
        raise ExportError(f"outcomes {path}: {error.strerror or 'unreadable'}") from None
    outcomes = Outcomes()
    with handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower() for c in reader.fieldnames or ()}
        if not columns & {"study_uid", "accession_number"}:
            raise ExportError(f"outcomes {path}: needs a study_uid or an accession_number column")
        if not columns & {"label", "malignant"}:
            raise ExportError(f"outcomes {path}: needs a label or a malignant column")
        try:
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "") for k, v in raw.items()}
                if not any(v.strip() for v in row.values()):
                    continue
                _add_outcome_row(outcomes, row, line)
        except (csv.Error, UnicodeDecodeError):
            raise ExportError(f"outcomes {path}: not a UTF-8 CSV file") from None
    return outcomes


def _add_outcome_row(outcomes: Outcomes, row: dict[str, str], line: int) -> None:
    malignant = _flag(row.get("malignant", ""), line, "malignant")
    label = _flag(row.get("label", ""), line, "label")
    if label is None:
        label = malignant
    if label is None:
        raise ExportError(f"outcomes line {line}: neither label nor malignant is given")
    if malignant == 1 and label == 0:
        raise ExportError(f"outcomes line {line}: malignant 1 with label 0")
    side = row.get("laterality", "").strip().upper()
    if side not in ("", "L", "R"):
        raise ExportError(f"outcomes line {line}: column laterality must be L, R or empty")
    study_uid = row.get("study_uid", "").strip()
    accession = row.get("accession_number", "").strip()
    if study_uid:
        table, key = outcomes.by_study, study_uid
    elif accession:
        table, key = outcomes.by_accession, accession
    else:
        raise ExportError(f"outcomes line {line}: neither study_uid nor accession_number is given")
    sides = table.setdefault(key, {})
    if side in sides:
        raise ExportError(f"outcomes line {line}: a second row for the same study and breast")
    sides[side] = Outcome(label=label, malignant=malignant)
    outcomes.rows += 1


# --- de-identification ---------------------------------------------------------------------------
class Refused(Exception):
    """An image that is not exported, and why (a reason code, no PHI)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _code_items(sequence: DicomSequence) -> DicomSequence:
    cleaned = []
    for item in sequence:
        kept = Dataset()
        for element in item:
            if element.keyword not in CODE_ITEM_KEYS:
                continue
            if element.VR == "SQ":
                setattr(kept, element.keyword, _code_items(element.value))
            else:
                kept.add(element)
        cleaned.append(kept)
    return DicomSequence(cleaned)


def retained_only(ds: Dataset) -> Dataset:
    """A new data set with the `RETAINED` attributes of `ds` (code sequences cleaned); no file meta."""
    kept = Dataset()
    for element in ds:
        if element.tag.is_private or element.keyword not in RETAINED:
            continue
        if element.VR == "SQ":
            setattr(kept, element.keyword, _code_items(element.value))
        else:
            kept.add(element)
    return kept


def dicognito_version() -> str:
    try:
        return version("dicognito")
    except PackageNotFoundError:
        return "unknown"


class Deidentifier:
    """De-identifies data sets with one dicognito Anonymizer per patient, seeded from the site key."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._anonymizers: dict[str, Any] = {}

    def patient_seed(self, ds: Dataset) -> tuple[str, bool]:
        """(seed, whether the data set names its patient). The seed is HMAC-SHA256 of the issuer
        and patient ID; a data set without a Patient ID is its study's own patient."""
        patient_id = str(ds.get("PatientID", "") or "").strip()
        if patient_id:
            issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
            subject, named = f"patient\0{issuer}\0{patient_id}", True
        else:
            subject, named = f"study\0{ds.get('StudyInstanceUID', '')}", False
        digest = hmac.new(self._key, subject.encode("utf-8"), hashlib.sha256).hexdigest()
        return digest, named

    def _anonymizer(self, seed: str) -> Any:
        anonymizer = self._anonymizers.get(seed)
        if anonymizer is None:
            from dicognito.anonymizer import Anonymizer

            anonymizer = Anonymizer(seed=seed)
            self._anonymizers[seed] = anonymizer
        return anonymizer

    def deidentify(self, ds: Dataset) -> Dataset:
        """The de-identified copy of a source image (a file data set with pixels), or Refused."""
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned_in != "NO":
            raise Refused("burned_in_annotation_yes" if burned_in == "YES"
                          else "burned_in_annotation_missing")
        if "PixelData" not in ds:
            raise Refused("no_pixel_data")
        seed, _ = self.patient_seed(ds)
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
        if transfer_syntax is None or transfer_syntax.is_compressed:
            try:
                ds.decompress()
            except Exception as error:  # the decoders raise anything
                raise Refused("undecodable_pixel_data") from error
        out = retained_only(ds)
        for keyword in (*EMPTIED, "PatientName", "PatientID", "AccessionNumber", "StudyID"):
            if keyword in EMPTIED or keyword not in out:
                setattr(out, keyword, "")  # type 2: present, empty or replaced by dicognito
        out.file_meta = FileMetaDataset()
        out.file_meta.MediaStorageSOPClassUID = out.SOPClassUID
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        self._anonymizer(seed).anonymize(out)
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = "MODIFIED"
        out.DeidentificationMethod = ["PS3.15 Basic Profile, modified dates",
                                      f"mammo-node {software_version()}"[:64],
                                      f"dicognito {dicognito_version()}"[:64]]
        out.DeidentificationMethodCodeSequence = DicomSequence([_code_item(c) for c in PROFILE_CODES])
        return out


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


# --- the export ----------------------------------------------------------------------------------
@dataclass
class ExportSummary:
    """Counts only (this goes to the audit trail, the log and export.json)."""

    runs_in_done: int = 0
    studies_exported: int = 0
    images_exported: int = 0
    labelled_images: int = 0
    unlabelled_images: int = 0
    patients: int = 0
    patients_without_id: int = 0
    skipped_runs: Counter[str] = field(default_factory=Counter)
    refused_images: Counter[str] = field(default_factory=Counter)
    outcome_rows: int = 0
    outcome_studies_unmatched: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "runs_in_done": self.runs_in_done, "studies_exported": self.studies_exported,
            "images_exported": self.images_exported, "labelled_images": self.labelled_images,
            "unlabelled_images": self.unlabelled_images, "patients": self.patients,
            "patients_without_id": self.patients_without_id,
            "skipped_runs": dict(sorted(self.skipped_runs.items())),
            "refused_images": dict(sorted(self.refused_images.items())),
            "outcome_rows": self.outcome_rows,
            "outcome_studies_unmatched": self.outcome_studies_unmatched,
        }


@dataclass(frozen=True)
class _Candidate:
    run_id: str
    folder: Path
    record: RunRecord
    finished_at: float


def _candidates(spool: Spool, since_days: float | None, now: float,
                summary: ExportSummary) -> list[_Candidate]:
    """The latest scored, not superseded run of each study in done/ (finished within the window)."""
    cutoff = None if since_days is None else now - since_days * 86400.0
    latest: dict[str, _Candidate] = {}
    for run_id in spool.runs("done"):
        summary.runs_in_done += 1
        folder = spool.state_dir("done") / run_id
        record = read_record(folder)
        try:
            finished_at = spool.finished_at("done", run_id)
        except FileNotFoundError:
            summary.skipped_runs["gone"] += 1
            continue
        if cutoff is not None and finished_at < cutoff:
            summary.skipped_runs["older_than_since"] += 1
            continue
        if record is None or record.state != "done":
            summary.skipped_runs["no_record"] += 1
            continue
        if record.superseded_by or read_superseded(folder) is not None:
            summary.skipped_runs["superseded"] += 1
            continue
        if record.scores is None or not record.inputs:
            summary.skipped_runs["not_scored"] += 1
            continue
        candidate = _Candidate(run_id, folder, record, finished_at)
        earlier = latest.get(record.study_uid)
        if earlier is not None:
            summary.skipped_runs["older_run_of_study"] += 1
            if earlier.finished_at >= finished_at:
                continue
        latest[record.study_uid] = candidate
    return sorted(latest.values(), key=lambda c: (c.finished_at, c.run_id))


def _scored_inputs(record: RunRecord) -> Iterator[InputDescription]:
    for entry in record.inputs or ():
        if entry.scored and entry.file and Path(entry.file).name == entry.file:
            yield entry


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: the output folder must be new or empty")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)


def _spacing_mm(ds: Dataset) -> float | None:
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(keyword)
        try:
            if value:
                return float(value[0])
        except (TypeError, ValueError, IndexError):
            continue
    return None


def export_training_set(spool: Spool, out: Path, key: bytes, outcomes: Outcomes | None = None,
                        since_days: float | None = None, now: float | None = None) -> ExportSummary:
    """Write the de-identified training set of the spool's done/ runs into `out` (new or empty)."""
    from pipelines.orientation import chest_wall_on_right_from_tags, upside_down_from_tags

    now = time.time() if now is None else now
    _prepare_out(out)
    summary = ExportSummary()
    deidentifier = Deidentifier(key)
    patients: set[str] = set()
    anonymous_patients: set[str] = set()
    labelled: list[dict[str, Any]] = []
    unlabelled: list[dict[str, Any]] = []
    for candidate in _candidates(spool, since_days, now, summary):
        record = candidate.record
        scores = record.scores
        assert scores is not None  # _candidates keeps scored runs only
        model = f"{record.model.name} {record.model.version}" if record.model else None
        exported = 0
        for entry in _scored_inputs(record):
            try:
                source = dcmread(candidate.folder / entry.file)
            except Exception:  # pydicom raises anything on a damaged file
                summary.refused_images["unreadable"] += 1
                continue
            accession = str(source.get("AccessionNumber", "") or "").strip()
            seed, named = deidentifier.patient_seed(source)
            orientation = list(source.get("PatientOrientation", []) or [])
            try:
                clean = deidentifier.deidentify(source)
            except Refused as refusal:
                summary.refused_images[refusal.reason] += 1
                log.info("training_export_image_refused", run_id=candidate.run_id,
                         reason=refusal.reason)
                continue
            name = f"{clean.SOPInstanceUID}.dcm"
            clean.save_as(out / IMAGES_DIR / name, enforce_file_format=True)
            (patients if named else anonymous_patients).add(seed)
            exported += 1
            outcome = outcomes.lookup(record.study_uid, accession, entry.laterality) if outcomes else None
            line: dict[str, Any] = {
                "id": str(clean.SOPInstanceUID), "image": f"{IMAGES_DIR}/{name}",
                "group": str(clean.PatientID), "study": str(clean.StudyInstanceUID),
                "laterality": entry.laterality, "view": entry.view,
                "label": outcome.label if outcome else None,
                "malignant": outcome.malignant if outcome else None,
                "chest_wall": "right" if chest_wall_on_right_from_tags(entry.laterality, orientation)
                else "left",
                "flip_rows": upside_down_from_tags(entry.laterality, entry.view, orientation),
                "lesions": [], "mask": None, "pixel_spacing_mm": _spacing_mm(clean),
                "manufacturer": str(clean.get("Manufacturer", "") or ""),
                "burned_in_annotation": "NO",
                "node_model": model,
                "node_view_score": scores.views.get(f"{entry.laterality}-{entry.view}"),
                "node_breast_score": scores.breasts.get(entry.laterality),
                "node_exam_score": scores.exam,
                "node_suspicious": scores.suspicious,
                "node_operating_point": scores.operating_point,
            }
            (labelled if outcome else unlabelled).append(line)
        if exported:
            summary.studies_exported += 1
            summary.images_exported += exported
    summary.patients = len(patients) + len(anonymous_patients)
    summary.patients_without_id = len(anonymous_patients)
    summary.labelled_images, summary.unlabelled_images = len(labelled), len(unlabelled)
    if outcomes is not None:
        summary.outcome_rows = outcomes.rows
        summary.outcome_studies_unmatched = outcomes.unmatched_studies
    _write_lines(out / MANIFEST_FILE, labelled)
    _write_lines(out / UNLABELLED_FILE, unlabelled)
    (out / SUMMARY_FILE).write_text(json.dumps({
        "created": dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": f"mammo-node {software_version()}",
        "deidentification": {
            "library": f"dicognito {dicognito_version()}",
            "profile": [f"{c.scheme_designator} {c.value} {c.meaning}" for c in PROFILE_CODES],
            "pseudonyms": "one dicognito Anonymizer per patient, seeded with HMAC-SHA256 of the "
                          "site key (not in this export)",
            "burned_in_annotation": "images with YES or without the attribute are refused",
        },
        "since_days": since_days, "outcomes": outcomes is not None,
        "counts": summary.as_json(),
    }, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _write_lines(path: Path, lines: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, sort_keys=True) + "\n")

"""Synthetic screening mammography studies: for `mammo-node selftest`, tests, demos and benchmarks.

Real mammograms carry PHI and cannot live in the repository, yet every stage of the node (receiver,
view selection, transforms, writers) needs MG instances that a strict validator accepts. This
module builds such instances: 12-bit MONOCHROME2 Digital Mammography X-Ray images with a
breast-like picture (tissue against the chest wall, pectoral muscle on MLO, optional bright
lesion), correct per-view orientation and the mammography attributes `dciodvfy` checks.
Everything, UIDs included, is a pure function of the arguments, so two runs with the same
arguments give identical files. It lives in `node/` because `mammo-node selftest` sends one
(node/ never imports tools/); `python -m tools.stack.make_study` is its command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from scipy import ndimage

from node.completion import SCREENING_VIEWS
from node.uids import derive_uid
from node.vocabulary import MG_FOR_PRESENTATION, MG_FOR_PROCESSING

FULL_ROWS = 4096
FULL_COLS = 3328
# Detector pitch of the full-size image; smaller images cover the same field with bigger pixels.
FULL_PIXEL_SPACING_MM = 0.07
SOURCE_TO_DETECTOR_MM = 650.0
SOURCE_TO_PATIENT_MM = 625.0
BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "j2k": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}
J2K_LOSSY_RATIO = 10.0

SOP_CLASSES: dict[str, UID] = {
    "presentation": MG_FOR_PRESENTATION,
    "processing": MG_FOR_PROCESSING,
}

# PatientOrientation (row direction \ column direction): the chest wall is posterior, so right
# breasts (chest wall on the right of the image) read P on rows, left breasts A.
PATIENT_ORIENTATION: dict[str, tuple[str, str]] = {
    "R-CC": ("P", "L"),
    "L-CC": ("A", "R"),
    "R-MLO": ("P", "F"),
    "L-MLO": ("A", "F"),
}
VIEW_CODES: dict[str, tuple[str, str]] = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
STUDY_DATE = "20250101"
STUDY_TIME = "090000"


@dataclass(frozen=True)
class StudySpec:
    """Everything that determines the generated study (and therefore its UIDs)."""

    views: tuple[str, ...] = SCREENING_VIEWS
    rows: int = 1024
    cols: int = 832
    transfer_syntax: str = "explicit"
    seed: int = 0
    patient_name: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    sop_class: str = "presentation"
    lesions: tuple[str, ...] = field(default=())
    corrupt: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for key in (*self.views, *self.lesions, *self.corrupt):
            if key not in PATIENT_ORIENTATION:
                raise ValueError(f"unknown view {key!r}; expected one of {sorted(PATIENT_ORIENTATION)}")
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"views repeated: {self.views}")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer_syntax {self.transfer_syntax!r} not one of {sorted(TRANSFER_SYNTAXES)}"
            )
        if self.sop_class not in SOP_CLASSES:
            raise ValueError(f"sop_class {self.sop_class!r} not one of {sorted(SOP_CLASSES)}")
        if not (16 <= self.rows <= 8192 and 16 <= self.cols <= 8192):
            raise ValueError(f"image size {self.rows} x {self.cols} outside 16..8192")

    @property
    def resolved_patient_id(self) -> str:
        return self.patient_id or f"SYN{self.seed:06d}"

    @property
    def resolved_patient_name(self) -> str:
        return self.patient_name or f"SYNTHETIC^SEED{self.seed}"

    @property
    def resolved_accession(self) -> str:
        return self.accession or f"ACC{self.seed:06d}"

    def study_key(self) -> tuple[str, ...]:
        """What identifies the study: the same seed for another patient is another study."""
        return ("make_study", str(self.seed), self.resolved_patient_id, self.resolved_accession)

    def image_key(self, view_key: str) -> tuple[str, ...]:
        """What identifies one image: anything that changes its pixels or its SOP class.

        The lossless transfer syntaxes are encodings of the same instance and share the UID; a
        lossy one is a new image (PS3.3 C.7.6.1.1.5) and gets its own.
        """
        lossy = "lossy" if self.transfer_syntax == "j2k-lossy" else "lossless"
        return (
            *self.study_key(),
            view_key,
            self.sop_class,
            f"{self.rows}x{self.cols}",
            "lesion" if view_key in self.lesions else "no-lesion",
            lossy,
        )


def pixel_spacing_mm(rows: int, cols: int) -> tuple[float, float]:
    """Row and column spacing so that any size covers the field of the full-size detector."""
    return (
        round(FULL_PIXEL_SPACING_MM * FULL_ROWS / rows, 6),
        round(FULL_PIXEL_SPACING_MM * FULL_COLS / cols, 6),
    )


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cell: int) -> np.ndarray:
    """Noise correlated over about `cell` pixels: made small and upsampled, so full size stays fast."""
    small = rng.standard_normal((rows // cell + 2, cols // cell + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, 1.0)
    big: np.ndarray = ndimage.zoom(small, cell, order=1)[:rows, :cols]
    return big / max(float(big.std()), 1e-6)


def render_breast(
    rows: int, cols: int, view_key: str, rng: np.random.Generator, lesion: bool
) -> np.ndarray:
    """A breast-like 12-bit image, chest wall on the right for R views and on the left for L views.

    Tissue is a half-ellipse whose brightness falls off towards the skin line, with two scales of
    texture; MLO views add a brighter pectoral triangle at the top of the chest wall.
    """
    laterality, view = view_key.split("-")
    y = (np.arange(rows, dtype=np.float32) / rows)[:, None]
    x = (np.arange(cols, dtype=np.float32) / cols)[None, :]
    depth = (1.0 - x) if laterality == "R" else x  # 0 at the chest wall, 1 at the far side
    centre_y, half_height = (0.5, 0.42) if view == "CC" else (0.55, 0.45)
    radius = np.sqrt((depth / 0.72) ** 2 + ((y - centre_y) / half_height) ** 2)
    inside = radius < 1.0
    thickness = np.sqrt(np.clip(1.0 - radius**2, 0.0, 1.0))

    texture = 0.7 * _smooth_noise(rng, rows, cols, max(rows // 24, 2))
    texture += 0.3 * _smooth_noise(rng, rows, cols, max(rows // 96, 1))
    image = np.full((rows, cols), 60.0, dtype=np.float32)
    image += rng.normal(0.0, 8.0, size=(rows, cols)).astype(np.float32)
    tissue = 900.0 + 1500.0 * thickness**0.5 + 260.0 * texture * thickness
    image = np.where(inside, tissue, image)

    if view == "MLO":
        pectoral = depth < 0.32 * (1.0 - y / 0.45)
        image = np.where(pectoral, image + 700.0, image)

    if lesion:
        image += _lesion_blob(rows, cols, depth, centre_y, rng)
    return np.clip(image, 0, MAX_VALUE).astype(np.uint16)


def _lesion_blob(
    rows: int, cols: int, depth: np.ndarray, centre_y: float, rng: np.random.Generator
) -> np.ndarray:
    """A bright, slightly irregular blob placed well inside the tissue."""
    target_depth = rng.uniform(0.25, 0.45)
    target_y = centre_y + rng.uniform(-0.15, 0.15)
    radius_px = 0.035 * min(rows, cols) + 2.0
    yy = np.arange(rows, dtype=np.float32)[:, None] - target_y * rows
    depth_px = (depth - target_depth) * cols
    dist2 = (yy**2 + depth_px**2) / radius_px**2
    blob: np.ndarray = 1400.0 * np.exp(-dist2) * (1.0 + 0.15 * np.cos(6 * np.arctan2(yy, depth_px)))
    return blob.astype(np.float32)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def format_ds(value: float) -> str:
    """A DS (decimal string) value within the 16 characters the VR allows."""
    return f"{value:.6g}"


def build_view_dataset(spec: StudySpec, view_key: str) -> Dataset:
    """One MG instance (header and uncompressed pixels) of the study described by `spec`."""
    laterality, view = view_key.split("-")
    sop_class_uid = SOP_CLASSES[spec.sop_class]
    for_presentation = spec.sop_class == "presentation"
    series_number = SCREENING_VIEWS.index(view_key) + 1
    study_uid = derive_uid(None, *spec.study_key(), "study")
    rng = np.random.default_rng(
        [spec.seed, series_number, 1 if view_key in spec.lesions else 0, spec.rows, spec.cols]
    )
    pixels = render_breast(spec.rows, spec.cols, view_key, rng, view_key in spec.lesions)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = derive_uid(None, *spec.image_key(view_key), "sop")
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = STUDY_TIME
    _add_patient_and_study(ds, spec, study_uid)
    _add_series_and_equipment(ds, spec, view_key, series_number, for_presentation)
    _add_image_attributes(ds, spec, view_key, laterality, view, for_presentation)
    add_pixels(ds, pixels)
    return ds


def _add_patient_and_study(ds: Dataset, spec: StudySpec, study_uid: str) -> None:
    ds.PatientName = spec.resolved_patient_name
    ds.PatientID = spec.resolved_patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = spec.resolved_accession
    ds.StudyDescription = "Screening mammography (synthetic)"


def _add_series_and_equipment(
    ds: Dataset, spec: StudySpec, view_key: str, series_number: int, for_presentation: bool
) -> None:
    ds.Modality = "MG"
    ds.SeriesInstanceUID = derive_uid(None, *spec.study_key(), "series", view_key, spec.sop_class)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = view_key.replace("-", " ")
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = STUDY_TIME
    ds.PresentationIntentType = "FOR PRESENTATION" if for_presentation else "FOR PROCESSING"
    ds.Manufacturer = "mammo-node synthetic"
    ds.ManufacturerModelName = "make_study"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic"


def _add_image_attributes(
    ds: Dataset, spec: StudySpec, view_key: str, laterality: str, view: str, for_presentation: bool
) -> None:
    ds.InstanceNumber = 1
    ds.PatientOrientation = list(PATIENT_ORIENTATION[view_key])
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = STUDY_TIME
    ds.AcquisitionDateTime = STUDY_DATE + STUDY_TIME
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image laterality is on the image; the series-level Laterality stays absent (PS3.3 C.7.3.1,
    # type 2C: only when ImageLaterality is not sent).
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = DicomSequence([_code_item("76752008", "SCT", "Breast")])
    ds.BodyPartExamined = "BREAST"
    ds.ViewPosition = view
    view_item = _code_item(*_view_code(view))
    view_item.ViewModifierCodeSequence = DicomSequence([])
    ds.ViewCodeSequence = DicomSequence([view_item])
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AcquisitionContextSequence = DicomSequence([])

    ds.DetectorType = "DIRECT"
    ds.DetectorConfiguration = "AREA"
    # PixelSpacing is the detector pitch corrected for geometric magnification (SID / SOD), as a
    # real unit reports it; ImagerPixelSpacing is the pitch at the detector.
    imager_spacing = pixel_spacing_mm(spec.rows, spec.cols)
    magnification = SOURCE_TO_DETECTOR_MM / SOURCE_TO_PATIENT_MM
    ds.ImagerPixelSpacing = [format_ds(v) for v in imager_spacing]
    ds.PixelSpacing = [format_ds(v / magnification) for v in imager_spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "corrected for estimated geometric magnification"
    ds.EstimatedRadiographicMagnificationFactor = format_ds(magnification)
    ds.DistanceSourceToDetector = format_ds(SOURCE_TO_DETECTOR_MM)
    ds.DistanceSourceToPatient = format_ds(SOURCE_TO_PATIENT_MM)
    ds.BodyPartThickness = "50"
    ds.CompressionForce = "100"
    ds.KVP = "28"
    ds.PositionerPrimaryAngle = "0" if view == "CC" else ("45" if laterality == "R" else "-45")

    ds.PixelIntensityRelationship = "LOG" if for_presentation else "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    if for_presentation:
        ds.WindowCenter = "2048"
        ds.WindowWidth = "4096"
        ds.WindowCenterWidthExplanation = "FULL RANGE"
        ds.VOILUTFunction = "LINEAR"


def _view_code(view: str) -> tuple[str, str, str]:
    value, meaning = VIEW_CODES[view]
    return value, "SCT", meaning


def add_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    """The Image Pixel module for our 12-bit MONOCHROME2 pictures (tests reuse it for their own pixels)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def encode_dataset(ds: Dataset, transfer_syntax: str) -> None:
    """Set the file meta and compress in place; lossy keeps our UID but records the loss."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    if uid == ExplicitVRLittleEndian:
        return
    if uid == JPEG2000:
        ds.compress(uid, generate_instance_uid=False, j2k_cr=[J2K_LOSSY_RATIO])
        ds.ImageType = ["DERIVED", "PRIMARY", ""]
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [format_ds(J2K_LOSSY_RATIO)]
        ds.LossyImageCompressionMethod = ["ISO_15444_1"]
        return
    ds.compress(uid, generate_instance_uid=False)


def corrupt_codestream(ds: Dataset) -> None:
    """Replace the JPEG 2000 frame by its main header followed by garbage.

    The DICOM header and the encapsulation stay valid (the receiver accepts the file), but no
    decoder can produce pixels: exactly the failure the worker must turn into an InputError.
    """
    frame = next(generate_fragmented_frames(ds.PixelData, number_of_frames=1))
    codestream = b"".join(frame)
    tile_start = codestream.find(b"\xff\x90")  # first SOT marker ends the main header
    header = codestream[: tile_start if tile_start > 0 else 64]
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8))
    ds.PixelData = encapsulate([header + b"\xff\x90" + garbage])


def make_study(
    out_dir: str | Path,
    views: Sequence[str] = SCREENING_VIEWS,
    rows: int = 1024,
    cols: int = 832,
    transfer_syntax: str = "explicit",
    seed: int = 0,
    patient_name: str | None = None,
    patient_id: str | None = None,
    accession: str | None = None,
    sop_class: str = "presentation",
    lesions: Sequence[str] = (),
    corrupt: Sequence[str] = (),
) -> list[Path]:
    """Write one instance per view to `out_dir` as `<view>.dcm` and return their paths.

    Views in `corrupt` are always written as JPEG 2000 with an undecodable codestream.
    """
    spec = StudySpec(
        views=tuple(views),
        rows=rows,
        cols=cols,
        transfer_syntax=transfer_syntax,
        seed=seed,
        patient_name=patient_name,
        patient_id=patient_id,
        accession=accession,
        sop_class=sop_class,
        lesions=tuple(lesions),
        corrupt=tuple(corrupt),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for view_key in spec.views:
        ds = build_view_dataset(spec, view_key)
        if view_key in spec.corrupt:
            encode_dataset(ds, "j2k")
            corrupt_codestream(ds)
        else:
            encode_dataset(ds, spec.transfer_syntax)
        path = out / f"{view_key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

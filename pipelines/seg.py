"""The heatmap as Segmentations (SEG), on the exact grid of each scored image.

Two kinds (`outputs.seg.kind`):

- **binary** (the default): one segment, the findings' regions at the model's operating point
  (`pipelines/findings.py`, the same regions the SRs mark), 1 bit per pixel, uncompressed
  (Explicit VR Little Endian: Orthanc 1.10 serves it to OHIF without transcoding, which it
  cannot do for a JPEG 2000 SEG, and a binary frame of a full-size view is only 1.7 MB). One per
  scored image: an image without a finding gets a SEG whose segment is empty, so every scored
  image has its SEG (a negative result stays visible as a result, and the objects of a run do
  not depend on what the model found).
- **fractional**: the full map, 0-255 (PROBABILITY), JPEG 2000 lossless, one per scored image.

highdicom's defaults are not enough for a 2-D mammography SEG; filled from the source here:
- Pixel Measures, with the compressed breast thickness as Slice Thickness.
- Plane Orientation and Plane Position (Patient), nominal (rows along +x, columns along +y,
  origin at 0): a projection mammogram has no patient coordinates, but OHIF's SEG loader needs
  the two functional groups, and with them pixelmed no longer asks for the Derivation Image
  macro in the shared groups nor for Patient Orientation (which pixelmed checks with VM 1 on a
  SEG, against PS3.6's 2, so it is not copied).
- Image Laterality (General Image, Type 3): pixelmed requires laterality on a SEG of a paired
  body part, dciodvfy refuses the series-level Laterality on it; Image Laterality satisfies both.
- Contributing Equipment (model and software version) and a series description that starts with
  the view and "outside domain" when the image is outside the model's declared domain (OHIF
  shows the series list, not the SR's text) and says "research use only"
  (`pipelines/attribution.py`).
The heatmap must already be on the source's Rows x Columns: highdicom cannot write another grid
without a Frame of Reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from node.uids import derive_uid
from node.vocabulary import EXPLICIT_VR_LITTLE_ENDIAN, SEGMENTATION_TRANSFER_SYNTAX
from pipelines.attribution import contributing_equipment, series_description
from pipelines.findings import Finding
from pipelines.results import ModelIdentity, OutputSpec
from pipelines.source_values import carry_source_values, highdicom_safe

SEGMENT_LABEL = "Suspicion heatmap"
REGIONS_LABEL = "Suspicious regions"
LESION = CodedConcept("52988006", "SCT", "Lesion")
MAX_FRACTIONAL_VALUE = 255
NOMINAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
NOMINAL_POSITION = (0.0, 0.0, 0.0)


def _pixel_spacing(source: Dataset) -> list[float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2:
            return [float(value[0]), float(value[1])]
    return None


def _thickness_mm(source: Dataset) -> float | None:
    """The compressed breast thickness, which is what a projection image integrates over.

    Pixel Measures' SliceThickness is optional for a SEG, but highdicom's reader requires it;
    the source's Body Part Thickness is the physically right value when the modality gave it.
    """
    value = source.get("BodyPartThickness")
    return float(value) if value not in (None, "") and float(value) > 0 else None


def _check_grid(source: Dataset, array: npt.NDArray[np.generic]) -> None:
    rows, cols = int(source.Rows), int(source.Columns)
    if array.shape != (rows, cols):
        raise ValueError(f"heatmap shape {array.shape} differs from the source's Rows x Columns "
                         f"({rows}, {cols})")


def _segment(label: str, model: ModelIdentity,
             parameters: dict[str, str] | None = None) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=LESION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=model.version,
            parameters=parameters,
        ),
        anatomic_regions=[codes.SCT.Breast],
    )


def _common(source: Dataset, model: ModelIdentity, output: OutputSpec, view_key: str | None,
            outside_domain: Sequence[str]) -> dict[str, object]:
    """What both kinds share: identity, equipment, geometry of the source, and a series
    description naming the view (each SEG is its own series) and whether the image is outside
    the model's declared domain (`pipelines/attribution.py`)."""
    spacing = _pixel_spacing(source)
    return {
        # highdicom reads patient and study from this copy; the received values are carried
        # back by `_fill_from_source` (pipelines/source_values.py).
        "source_images": [highdicom_safe(source)],
        "series_number": output.series_number,
        "instance_number": 1,
        "manufacturer": output.manufacturer,
        "manufacturer_model_name": model.name,
        "software_versions": output.software_version,
        "device_serial_number": "0",
        "pixel_measures": (hd.PixelMeasuresSequence(pixel_spacing=spacing,
                                                    slice_thickness=_thickness_mm(source))
                           if spacing else None),
        "omit_empty_frames": False,
        "series_description": series_description(output.series_description, view_key,
                                                 outside_domain=bool(outside_domain)),
    }


def build_seg(
    source: Dataset, heatmap: np.ndarray, model: ModelIdentity, output: OutputSpec,
    view_key: str | None = None, outside_domain: Sequence[str] = (),
) -> hd.seg.Segmentation:
    """One-segment fractional SEG of `source` (the full map); deterministic UIDs from the source
    and model. `view_key` ("L-CC") and `outside_domain` (the image's outside_domain reasons,
    `pipelines/quality.py`) go into the series description."""
    _check_grid(source, heatmap)
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values")
    seg = hd.seg.Segmentation(
        pixel_array=np.clip(heatmap, 0.0, 1.0).astype(np.float32)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[_segment(SEGMENT_LABEL, model)],
        series_instance_uid=derive_uid(output.uid_root, "seg-series", str(source.SOPInstanceUID),
                                       model.name, model.version),  # one series per image: see below
        sop_instance_uid=derive_uid(output.uid_root, "seg", str(source.SOPInstanceUID),
                                    model.name, model.version),
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        transfer_syntax_uid=SEGMENTATION_TRANSFER_SYNTAX,
        content_label="HEATMAP",
        content_description=f"Suspicion heatmap, {model.name} {model.version}"[:64],
        **_common(source, model, output, view_key, outside_domain),  # type: ignore[arg-type]
    )
    _fill_from_source(seg, source, model)
    return seg


def build_binary_seg(
    source: Dataset, findings: Sequence[Finding], model: ModelIdentity, output: OutputSpec,
    view_key: str | None = None, outside_domain: Sequence[str] = (),
) -> hd.seg.Segmentation:
    """One-segment binary SEG of `source`: the union of the findings' regions (empty when there
    is none). Deterministic UIDs from the source and model (the operating point is the model's).
    `view_key` and `outside_domain` go into the series description, as for `build_seg`."""
    mask = np.zeros((int(source.Rows), int(source.Columns)), dtype=bool)
    for finding in findings:
        _check_grid(source, finding.mask)
        mask |= finding.mask
    threshold = f"{model.operating_point:g}"
    found = f"{len(findings)} region(s)" if findings else "no region"
    seg = hd.seg.Segmentation(
        pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(REGIONS_LABEL, model, {
            "operating_point": threshold, "operating_point_name": model.operating_point_name})],
        # One series per source image: OHIF builds one SEG display set per series, from its last
        # instance only, so SEGs of four views in one series would show a single view's regions.
        series_instance_uid=derive_uid(output.uid_root, "seg-binary-series",
                                       str(source.SOPInstanceUID), model.name, model.version),
        sop_instance_uid=derive_uid(output.uid_root, "seg-binary", str(source.SOPInstanceUID),
                                    model.name, model.version),
        transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
        content_label="REGIONS",
        content_description=f"{found} at or above {threshold}"[:64],
        **_common(source, model, output, view_key, outside_domain),  # type: ignore[arg-type]
    )
    _fill_from_source(seg, source, model)
    return seg


def _fill_from_source(seg: Dataset, source: Dataset, model: ModelIdentity) -> None:
    """What a 2-D MG SEG needs from its source beyond highdicom's defaults (see the module)."""
    carry_source_values(source, seg)
    laterality = source.get("ImageLaterality") or source.get("Laterality")
    if laterality in ("R", "L", "B", "U"):
        seg.ImageLaterality = laterality
    if "BodyPartExamined" in source:
        seg.BodyPartExamined = source.BodyPartExamined
    if "PatientOrientation" in seg:
        del seg.PatientOrientation
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared:
        orientation = Dataset()
        orientation.ImageOrientationPatient = list(NOMINAL_ORIENTATION)
        shared.PlaneOrientationSequence = DicomSequence([orientation])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        if "PlanePositionSequence" not in frame and "PlanePositionSequence" not in shared:
            position = Dataset()
            position.ImagePositionPatient = list(NOMINAL_POSITION)
            frame.PlanePositionSequence = DicomSequence([position])
    seg.ContributingEquipmentSequence = contributing_equipment(model)


def _highdicom_can_read(ds: Dataset) -> bool:
    """Whether highdicom 0.28's reader accepts the SEG: it requires Slice Thickness in Pixel
    Measures whenever the sequence is present. That is highdicom's strictness, not a fault of
    ours: PS3.3 C.7.6.16.2.1 makes Slice Thickness conditional for a SEG on a Frame of Reference,
    which a SEG of a projection image does not have (dciodvfy accepts it), and no true thickness
    exists to write when the source had no Body Part Thickness."""
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    measures = shared[0].get("PixelMeasuresSequence") or [Dataset()]
    return "SliceThickness" in measures[0] and "PixelSpacing" in measures[0]


def _read_frame(ds: Dataset) -> npt.NDArray[np.float32]:
    """The one frame of one of our SEGs, as stored values (0/1 or 0..MaximumFractionalValue)."""
    if _highdicom_can_read(ds):
        seg = hd.seg.Segmentation.from_dataset(ds, copy=True)
        [(_, _, source_uid)] = seg.get_source_image_uids()
        pixels = seg.get_pixels_by_source_instance(
            [source_uid], segment_numbers=[1], rescale_fractional=False, dtype=np.float32
        )
        return np.asarray(pixels[0, :, :, 0], dtype=np.float32)
    frames = ds.pixel_array.astype(np.float32)
    return np.asarray(frames[0] if frames.ndim == 3 else frames, dtype=np.float32)


def read_seg_heatmap(ds: Dataset) -> npt.NDArray[np.float32]:
    """The fractional heatmap of one of our SEGs, float32 in [0, 1] on the source grid.

    Read through highdicom (which checks the SEG's structure and maps the frame to its source
    image) whenever it can parse the object; pydicom reads the one frame only for SEGs that
    highdicom refuses although they conform, see `_highdicom_can_read`.
    """
    if ds.SegmentationType != "FRACTIONAL":
        raise ValueError(f"not a fractional SEG (SegmentationType {ds.SegmentationType})")
    return np.asarray(_read_frame(ds) / np.float32(ds.MaximumFractionalValue), dtype=np.float32)


def read_seg_regions(ds: Dataset) -> npt.NDArray[np.bool_]:
    """The suspicious regions of one of our binary SEGs, a boolean mask on the source grid."""
    if ds.SegmentationType != "BINARY":
        raise ValueError(f"not a binary SEG (SegmentationType {ds.SegmentationType})")
    return np.asarray(_read_frame(ds) > 0, dtype=np.bool_)

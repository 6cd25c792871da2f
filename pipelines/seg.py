"""A fractional Segmentation per scored image: the heatmap, on the image's exact grid.

highdicom's defaults are not enough for a clean 2-D mammography SEG: the source has no Frame of
Reference, so pixel measures (with the compressed breast thickness) and patient orientation are
filled from the source here. Series Laterality is not written: dciodvfy rejects it on a SEG (its
condition is not met), and the source image reference carries the laterality. The heatmap must
already be on the source's Rows x Columns: highdicom cannot write a smaller grid without a Frame
of Reference.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.uids import derive_uid
from node.vocabulary import SEGMENTATION_TRANSFER_SYNTAX
from pipelines.results import ModelIdentity, OutputSpec

SEGMENT_LABEL = "Suspicion heatmap"
LESION = CodedConcept("52988006", "SCT", "Lesion")
MAX_FRACTIONAL_VALUE = 255


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


def build_seg(
    source: Dataset, heatmap: np.ndarray, model: ModelIdentity, output: OutputSpec
) -> hd.seg.Segmentation:
    """One-segment fractional SEG of `source`; deterministic UIDs from the source and model."""
    rows, cols = int(source.Rows), int(source.Columns)
    if heatmap.shape != (rows, cols):
        raise ValueError(f"heatmap shape {heatmap.shape} differs from the source's Rows x Columns "
                         f"({rows}, {cols})")
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=LESION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=model.version,
        ),
        anatomic_regions=[codes.SCT.Breast],
    )
    parts = ("seg", str(source.SOPInstanceUID), model.name, model.version)
    spacing = _pixel_spacing(source)
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=np.clip(heatmap, 0.0, 1.0).astype(np.float32)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description],
        series_instance_uid=derive_uid(output.uid_root, "seg-series", str(source.StudyInstanceUID),
                                       model.name, model.version),
        series_number=output.series_number,
        sop_instance_uid=derive_uid(output.uid_root, *parts),
        instance_number=1,
        manufacturer=output.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=output.software_version,
        device_serial_number="0",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        transfer_syntax_uid=SEGMENTATION_TRANSFER_SYNTAX,
        pixel_measures=(hd.PixelMeasuresSequence(pixel_spacing=spacing,
                                                 slice_thickness=_thickness_mm(source))
                        if spacing else None),
        omit_empty_frames=False,
        series_description=output.series_description,
        content_label="HEATMAP",
        content_description=f"Suspicion heatmap, {model.name} {model.version}",
    )
    _fill_from_source(seg, source)
    return seg


def _fill_from_source(seg: Dataset, source: Dataset) -> None:
    """What a 2-D MG SEG needs from its source beyond highdicom's defaults."""
    if "PatientOrientation" in source:
        seg.PatientOrientation = source.PatientOrientation
    if "BodyPartExamined" in source:
        seg.BodyPartExamined = source.BodyPartExamined


def _highdicom_can_read(ds: Dataset) -> bool:
    """Whether highdicom 0.28's reader accepts the SEG: it requires Slice Thickness in Pixel
    Measures whenever the sequence is present. That is highdicom's strictness, not a fault of
    ours: PS3.3 C.7.6.16.2.1 makes Slice Thickness conditional for a SEG on a Frame of Reference,
    which a SEG of a projection image does not have (dciodvfy accepts it), and no true thickness
    exists to write when the source had no Body Part Thickness."""
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    measures = shared[0].get("PixelMeasuresSequence") or [Dataset()]
    return "SliceThickness" in measures[0] and "PixelSpacing" in measures[0]


def read_seg_heatmap(ds: Dataset) -> npt.NDArray[np.float32]:
    """The fractional heatmap of one of our SEGs, float32 in [0, 1] on the source grid.

    Read through highdicom (which checks the SEG's structure and maps the frame to its source
    image) whenever it can parse the object; pydicom reads the one frame only for SEGs that
    highdicom refuses although they conform, see `_highdicom_can_read`.
    """
    if _highdicom_can_read(ds):
        seg = hd.seg.Segmentation.from_dataset(ds, copy=True)
        [(_, _, source_uid)] = seg.get_source_image_uids()
        pixels = seg.get_pixels_by_source_instance(
            [source_uid], segment_numbers=[1], rescale_fractional=True, dtype=np.float32
        )
        return np.asarray(pixels[0, :, :, 0], dtype=np.float32)
    frames = ds.pixel_array.astype(np.float32)
    if frames.ndim == 3:
        frames = frames[0]
    return np.asarray(frames / np.float32(ds.MaximumFractionalValue), dtype=np.float32)

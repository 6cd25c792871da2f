"""The Secondary Capture overlay (opt-in): what the model saw, burned into a picture any PACS shows.

For sites whose PACS or viewer shows neither SR marks nor SEGs: a reduced copy of each scored
view (longest side at most `outputs.sc.max_side_px`), 8-bit RGB, with the heatmap blended in
colour, the findings (`pipelines/findings.py`, the same regions the SRs and the binary SEG
carry) outlined and numbered with their score, and the label "AI output - research use only,
not for diagnosis" burned in (Burned In Annotation YES), with a line under it when the view is
outside the model's declared domain ("L-CC: outside the model's declared domain (pixel size)").
One Secondary Capture Image per view, in its own series, uncompressed (Orthanc serves it to web
viewers without transcoding).

The pixels given are the worker's decoded image in MONOCHROME2 sense and in the *source's*
orientation (the caller undoes the model orientation), so the picture looks like the image it
stands beside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.uids import derive_uid
from node.vocabulary import EXPLICIT_VR_LITTLE_ENDIAN
from pipelines.attribution import contributing_equipment, series_description
from pipelines.findings import Finding
from pipelines.results import ModelIdentity, OutputSpec
from pipelines.source_values import carry_source_values, highdicom_safe

BURNED_IN_LABEL = "AI output - research use only, not for diagnosis"
HEAT_FLOOR = 0.2  # below this the map is not tinted: the breast stays readable
HEAT_OPACITY = 0.5  # at a heatmap value of 1
MARK_COLOUR = (0, 255, 255)  # cyan: distinct from the red-yellow heat and from grey tissue
LABEL_COLOUR = (255, 255, 0)


def _reduced(array: npt.NDArray[np.number[Any]], size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """`array` resized to (width, height) by box averaging (the right filter to shrink)."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32)


def _grey(pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """0..1 grey from stored values, windowed on the image's own range (1st to 99.5th
    percentile), so any detector's bit depth gives a readable picture."""
    low, high = np.percentile(pixels, (1.0, 99.5))
    if high <= low:
        return np.zeros_like(pixels)
    return np.asarray(np.clip((pixels - low) / (high - low), 0.0, 1.0), dtype=np.float32)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
             width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render_overlay(pixels: npt.NDArray[np.number[Any]], heatmap: npt.NDArray[np.floating],
                   findings: Sequence[Finding], max_side_px: int,
                   notes: Sequence[str] = ()) -> npt.NDArray[np.uint8]:
    """The RGB picture (rows, columns, 3): reduced grey image, heat tint, marks, label, and
    under the label each of `notes` (e.g. that the image is outside the model's domain)."""
    rows, cols = pixels.shape
    if heatmap.shape != (rows, cols):
        raise ValueError(f"heatmap shape {heatmap.shape} differs from the image's {(rows, cols)}")
    scale = min(1.0, max_side_px / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))  # (width, height)
    grey = _grey(_reduced(pixels, size))
    heat = np.clip(_reduced(heatmap, size), 0.0, 1.0)
    alpha = np.where(heat >= HEAT_FLOOR, HEAT_OPACITY * heat, 0.0)[..., None]
    tint = np.stack([np.ones_like(heat), 1.0 - heat, np.zeros_like(heat)], axis=-1)  # yellow→red
    rgb = (1.0 - alpha) * grey[..., None] + alpha * tint
    image = Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(size) / 400))
    font = _font(max(12, round(max(size) / 48)))
    for number, finding in enumerate(findings, start=1):
        first_col, first_row, last_col, last_row = finding.bounding_box
        box = (first_col * scale - width, first_row * scale - width,
               (last_col + 1) * scale + width, (last_row + 1) * scale + width)
        draw.ellipse(box, outline=MARK_COLOUR, width=width)
        draw.text((box[2] + width, box[1]), f"{number}: {finding.score:.2f}", fill=MARK_COLOUR,
                  font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    label_font = _font(max(12, round(max(size) / 40)))
    margin = max(4, round(max(size) / 100))
    top = margin
    for index, text in enumerate([BURNED_IN_LABEL, *notes]):
        lines = [text] if index == 0 else _wrapped(draw, text, label_font, size[0] - 2 * margin)
        for line in lines:
            left, line_top, right, bottom = draw.textbbox((margin, top), line, font=label_font)
            draw.rectangle((left - margin // 2, line_top - margin // 2, right + margin // 2,
                            bottom + margin // 2), fill=(0, 0, 0))
            draw.text((margin, top), line, fill=LABEL_COLOUR, font=label_font)
            top = bottom + margin // 2
    return np.asarray(image, dtype=np.uint8)


def build_overlay(source: Dataset, pixels: npt.NDArray[np.number[Any]],
                  heatmap: npt.NDArray[np.floating], findings: Sequence[Finding],
                  model: ModelIdentity, output: OutputSpec, max_side_px: int,
                  caveat: str | None = None) -> Dataset:
    """A Secondary Capture Image of `source` with the overlay; deterministic UIDs. `caveat`
    (`pipelines/attribution.py:domain_caveat`, for an image outside the model's declared domain)
    is burned in under the label and said in the Derivation Description."""
    rows, cols = int(source.Rows), int(source.Columns)
    if pixels.shape != (rows, cols):
        raise ValueError(f"pixels shape {pixels.shape} differs from the source's Rows x Columns")
    picture = render_overlay(pixels, heatmap, findings, max_side_px,
                             [caveat] if caveat else [])
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_safe(source),  # values carried back below (source_values.py)
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derive_uid(output.uid_root, "sc-series", str(source.StudyInstanceUID),
                                       model.name, model.version),
        series_number=output.series_number,
        sop_instance_uid=derive_uid(output.uid_root, "sc", str(source.SOPInstanceUID),
                                    model.name, model.version),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=output.manufacturer,
        patient_orientation=(tuple(orientation) if orientation is not None
                             and len(orientation) == 2 else None),
        laterality=_laterality(source),
        transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
    )
    _describe(sc, source, model, output, picture.shape[:2], (rows, cols), caveat)
    carry_source_values(source, sc)
    return sc


def _laterality(source: Dataset) -> str | None:
    value = source.get("ImageLaterality") or source.get("Laterality")
    return str(value) if value in ("R", "L") else None


def _describe(sc: Dataset, source: Dataset, model: ModelIdentity, output: OutputSpec,
              shape: tuple[int, ...], source_shape: tuple[int, int],
              caveat: str | None = None) -> None:
    """What says where the picture comes from and that it is AI output for research use."""
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = series_description(output.series_description)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (f"Reduced copy of the source image with the heatmap and findings "
                                f"of model {model.name} {model.version} burned in. "
                                f"{BURNED_IN_LABEL}." + (f" {caveat}." if caveat else ""))[:1024]
    sc.ManufacturerModelName = model.name[:64]
    sc.SoftwareVersions = output.software_version[:64]
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2:
        factor = source_shape[0] / shape[0]
        sc.NominalScannedPixelSpacing = [f"{float(v) * factor:.6g}" for v in spacing]
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = source.SOPClassUID
    referenced.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = DicomSequence([referenced])
    sc.ContributingEquipmentSequence = contributing_equipment(model)


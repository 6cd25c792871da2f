"""The command line of the synthetic studies (node/synthetic.py) for tests, demos and benchmarks.

Real mammograms carry PHI and cannot live in the repository, yet every stage of the node (receiver,
view selection, transforms, writers) needs MG instances that a strict validator accepts. This tool
writes such instances: 12-bit MONOCHROME2 Digital Mammography X-Ray images with a breast-like
picture (tissue against the chest wall, pectoral muscle on MLO, optional bright lesion), correct
per-view orientation and the mammography attributes `dciodvfy` checks. Everything, UIDs included,
is a pure function of the arguments, so two runs with the same arguments give identical files.

    python -m tools.stack.make_study OUT_DIR [--views R-CC,L-CC,R-MLO,L-MLO] [--rows 1024 --cols 832 | --full]
        [--transfer-syntax explicit|j2k|j2k-lossy|rle|jpegls] [--seed N] [--lesion R-CC,...]
        [--corrupt R-CC,...] [--patient-name ...] [--patient-id ...] [--accession ...]
        [--sop-class presentation|processing]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from node.completion import SCREENING_VIEWS
from node.synthetic import (
    BITS_STORED,
    FULL_COLS,
    FULL_PIXEL_SPACING_MM,
    FULL_ROWS,
    J2K_LOSSY_RATIO,
    MAX_VALUE,
    PATIENT_ORIENTATION,
    SOP_CLASSES,
    SOURCE_TO_DETECTOR_MM,
    SOURCE_TO_PATIENT_MM,
    STUDY_DATE,
    STUDY_TIME,
    TRANSFER_SYNTAXES,
    VIEW_CODES,
    StudySpec,
    add_pixels,
    build_view_dataset,
    corrupt_codestream,
    encode_dataset,
    format_ds,
    make_study,
    pixel_spacing_mm,
    render_breast,
)

__all__ = [
    "BITS_STORED",
    "FULL_COLS",
    "FULL_PIXEL_SPACING_MM",
    "FULL_ROWS",
    "J2K_LOSSY_RATIO",
    "MAX_VALUE",
    "PATIENT_ORIENTATION",
    "SOP_CLASSES",
    "SOURCE_TO_DETECTOR_MM",
    "SOURCE_TO_PATIENT_MM",
    "STUDY_DATE",
    "STUDY_TIME",
    "StudySpec",
    "TRANSFER_SYNTAXES",
    "VIEW_CODES",
    "add_pixels",
    "build_view_dataset",
    "corrupt_codestream",
    "encode_dataset",
    "format_ds",
    "make_study",
    "pixel_spacing_mm",
    "render_breast",
]


def _view_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.stack.make_study", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--views", type=_view_list, default=list(SCREENING_VIEWS))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help=f"{FULL_ROWS} x {FULL_COLS} (benchmarks)")
    size.add_argument("--rows", type=int, default=None)
    parser.add_argument("--cols", type=int, default=None)
    parser.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patient-name")
    parser.add_argument("--patient-id")
    parser.add_argument("--accession")
    parser.add_argument("--sop-class", choices=sorted(SOP_CLASSES), default="presentation")
    parser.add_argument("--lesion", type=_view_list, default=[], help="views with a lesion blob")
    parser.add_argument(
        "--corrupt", type=_view_list, default=[], help="views written with a garbled JPEG 2000"
    )
    args = parser.parse_args(argv)
    if args.full and args.cols is not None:
        parser.error("--cols cannot be combined with --full")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows, cols = (FULL_ROWS, FULL_COLS) if args.full else (args.rows or 1024, args.cols or 832)
    try:
        paths = make_study(
            args.out_dir,
            views=args.views,
            rows=rows,
            cols=cols,
            transfer_syntax=args.transfer_syntax,
            seed=args.seed,
            patient_name=args.patient_name,
            patient_id=args.patient_id,
            accession=args.accession,
            sop_class=args.sop_class,
            lesions=args.lesion,
            corrupt=args.corrupt,
        )
    except ValueError as exc:
        print(f"make_study: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How large the flagged regions of a bundle are: the findings (pipelines/findings.py) at the
balanced operating point as a share of the breast, on the MIAS films of every fourth woman.

    python -m tools.model.extent --bundle models/mias-baseline --mias ../shared/data/mias

The films are part of the bundle's training data (in-sample): this reads the size of the regions
the worker would draw, not how well they find lesions (the card's nested lesion hits do)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from pipelines.breast import breast_mask
from pipelines.findings import find_findings
from pipelines.model import load_bundle
from tools.model.dataset import load_pixels, mias_records, to_model_orientation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mias", required=True)
    parser.add_argument("--every", type=int, default=4, help="every n-th woman")
    args = parser.parse_args(argv)
    runner = load_bundle(args.bundle, "cpu")
    point = float(runner.metadata["operating_points"]["balanced"])
    records = mias_records(args.mias)
    groups = sorted({r.group for r in records})
    chosen = set(groups[:: args.every])
    shares, flagged, with_finding, films = [], 0, 0, 0
    for group in sorted(chosen):
        pair = sorted((r for r in records if r.group == group), key=lambda r: r.laterality)
        images = [to_model_orientation(load_pixels(r), r) for r in pair]
        other = [1, 0] if len(pair) == 2 else [None]
        predictions = runner.predict(images, [r.view for r in pair],
                                     [r.pixel_spacing_mm for r in pair], other)
        for image, record, prediction in zip(images, pair, predictions, strict=True):
            films += 1
            if prediction.probability < point:
                continue
            flagged += 1
            findings = find_findings(prediction.heatmap, point)
            with_finding += bool(findings)
            breast = int(breast_mask(image, record.view).sum())
            shares.append(sum(f.area_px for f in findings) / max(1, breast))
    result = {"bundle": runner.metadata.get("version"), "films": films, "flagged": flagged,
              "flagged_with_a_finding": with_finding, "operating_point": round(point, 4),
              "median_share_of_breast": round(float(np.median(shares)), 4) if shares else None,
              "p90_share_of_breast": round(float(np.percentile(shares, 90)), 4) if shares else None}
    print(json.dumps(result), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

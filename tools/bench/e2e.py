"""Seconds from the last instance sent to SR + SEG stored in Orthanc, with the breakdown.

Runs the same topology as `make demo` (Redis, Orthanc, node, one worker on loopback), sends
4-view studies with storescu one after the other, and reads each run's record for the stages:
completion, queue, decode, preprocess, inference, heatmap, write, send.

    .venv/bin/python -m tools.bench.e2e [--studies 3] [--rows 4096 --cols 3328] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from tools.stack.make_study import make_study
from tools.stack.node_stack import DEFAULT_BUNDLE, NodeStack

STAGES = ("completion", "queue", "decode", "preprocess", "inference", "heatmap", "write", "send")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=3328)
    parser.add_argument("--transfer-syntax", default="explicit")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the shipped one)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    flag = {"explicit": [], "j2k": ["-xv"], "rle": ["-xr"], "jpegls": ["-xt"]}[args.transfer_syntax]
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    try:
        bundle = {"bundle_dir": args.bundle.resolve()} if args.bundle else {}
        with NodeStack(work / "stack", quiet_period_s=30, **bundle) as stack:
            for index in range(args.studies + 1):  # the first study warms the worker up
                paths = make_study(work / f"study{index}", rows=args.rows, cols=args.cols,
                                   seed=1000 + index, transfer_syntax=args.transfer_syntax)
                study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
                result = stack.storescu(paths, *flag)
                sent_at = time.monotonic()
                if result.returncode != 0:
                    raise RuntimeError(result.stderr)
                stack.wait_for_results(study_uid, seg_count=len(paths), timeout_s=600)
                elapsed = time.monotonic() - sent_at
                record = stack.wait_for_record(study_uid)
                if index == 0:
                    continue
                totals.append(elapsed)
                for stage in STAGES:
                    stages[stage].append(float(record["timings_s"].get(stage, 0.0)))
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"\nEnd to end: last instance sent -> SR + 4 SEG stored in Orthanc; "
              f"4 x {args.rows} x {args.cols} ({size_mb:.0f} MB, {args.transfer_syntax}); "
              f"median of {len(totals)} studies after 1 warm-up\n")
        metadata = json.loads(((args.bundle or DEFAULT_BUNDLE) / "metadata.json").read_text())
        print(f"Machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; bundle {metadata.get('name')} "
              f"{metadata.get('version')}, load average at the end "
              f"{os.getloadavg()[0]:.2f}\n")
        print("| stage | seconds (median) |")
        print("|---|---|")
        for stage in STAGES:
            print(f"| {stage} | {statistics.median(stages[stage]):.2f} |")
        print(f"| **total (wall, measured outside)** | **{statistics.median(totals):.2f}** |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Studies per hour: N 4-view studies queued at once, scored by the worker(s), with the stages.

Same topology as `make demo` (Redis, Orthanc as the PACS, `serve`, one worker process with the
model on every core). All studies are sent first, one association each, so the queue is full
while the worker runs; the rate is the number of studies over the time from the first send to
the last run record in done/. The stage table is the mean per study from the run records.

    .venv/bin/python -m tools.bench.throughput [--studies 20] [--rows 4096 --cols 3328]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from tools.bench.e2e import STAGES
from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=3328)
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the shipped one)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    try:
        studies = []
        for index in range(args.studies + 1):  # the first one warms the worker up, alone
            paths = make_study(work / f"study{index}", rows=args.rows, cols=args.cols,
                               seed=2000 + index)
            studies.append((paths, str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)))
        bundle = {"bundle_dir": args.bundle.resolve()} if args.bundle else {}
        with NodeStack(work / "stack", quiet_period_s=30, **bundle) as stack:
            (warm_paths, warm_uid), queued = studies[0], studies[1:]
            if stack.storescu(warm_paths).returncode != 0:
                raise RuntimeError("the warm-up study was not accepted")
            stack.wait_for_record(warm_uid, timeout_s=600)
            started = time.monotonic()
            for paths, _ in queued:
                result = stack.storescu(paths)
                if result.returncode != 0:
                    raise RuntimeError(result.stderr)
            sent_s = time.monotonic() - started
            records = [stack.wait_for_record(uid, timeout_s=600 + 60 * len(queued))
                       for _, uid in queued]
            elapsed_s = time.monotonic() - started
        failed = [r for r in records if r["state"] != "done"]
        per_hour = len(records) / elapsed_s * 3600
        size_mb = sum(p.stat().st_size for p in queued[0][0]) / 1e6
        print(f"\nThroughput: {len(records)} studies of 4 x {args.rows} x {args.cols} "
              f"({size_mb:.0f} MB each, uncompressed) queued at once, one worker process; "
              f"{len(failed)} not done\n")
        print(f"Machine: {platform.node()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}\n")
        print(f"- all sent in {sent_s:.1f} s; last result stored after {elapsed_s:.1f} s")
        print(f"- **{per_hour:.0f} studies per hour** (this machine, one worker process)\n")
        print("| stage | seconds per study (mean) |")
        print("|---|---|")
        for stage in STAGES:
            values = [float(r["timings_s"].get(stage, 0.0)) for r in records]
            print(f"| {stage} | {statistics.mean(values):.2f} |")
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

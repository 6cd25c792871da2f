"""`make demo`: a screening study through the whole node, on loopback, then everything stopped.

Starts Redis, an Orthanc playing the PACS, `mammo-node serve` and one worker; sends a synthetic
4-view study with dcmtk's storescu; waits for the SR and SEG objects in Orthanc; prints the
scores read back from the SR and the Orthanc IDs of what landed.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from pipelines.sr import read_sr_scores
from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack


def _print_scores(scores: dict, operating_point: float | None) -> None:
    print("\nScores read back from the SR stored in Orthanc")
    print(f"  {'level':<8} {'item':<8} {'probability':>11}")
    for key, value in sorted(scores.get("views", {}).items()):
        print(f"  {'view':<8} {key:<8} {value:>11.3f}")
    for key, value in sorted(scores.get("breasts", {}).items()):
        print(f"  {'breast':<8} {key:<8} {value:>11.3f}")
    exam = scores.get("exam")
    if exam is not None:
        print(f"  {'exam':<8} {'':<8} {exam:>11.3f}")
    if operating_point is not None:
        verdict = scores.get("qualitative", {}).get("exam") or "?"
        print(f"  exam at the balanced operating point ({operating_point:.3f}): {verdict}")
    if scores.get("missing_views"):
        print(f"  views missing: {', '.join(scores['missing_views'])}")


def run_demo(work_dir: Path, keep: bool) -> int:
    stack = NodeStack(work_dir, quiet_period_s=5)
    print(f"Starting Redis, Orthanc, the node and a worker under {work_dir} ...")
    started = time.monotonic()
    try:
        stack.start()
        print(f"  Orthanc (PACS)  REST {stack.orthanc.rest_url}  DICOM port {stack.orthanc.dicom_port}")
        print(f"  mammo-node      AE MAMMO_NODE on 127.0.0.1:{stack.node_port}")
        print(f"  ready in {time.monotonic() - started:.1f} s")
        paths = make_study(work_dir / "study", rows=2048, cols=1664, seed=7, lesions=["L-MLO"])
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        print(f"\nSending a synthetic 4-view screening study ({len(paths)} images, 2048 x 1664) "
              "with storescu ...")
        sent_at = time.monotonic()
        result = stack.storescu(paths)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        ids = stack.wait_for_results(study_uid, seg_count=len(paths), timeout_s=300)
        print(f"  results stored in Orthanc {time.monotonic() - sent_at:.1f} s after sending")
        record = stack.wait_for_record(study_uid, timeout_s=30)
        sr = dcmread(io.BytesIO(stack.orthanc.get_instance_file(ids["sr"][0])))
        _print_scores(read_sr_scores(sr), record.get("scores", {}).get("operating_point"))
        print("\nWhere the results landed (Orthanc instance IDs)")
        print(f"  SR : {', '.join(ids['sr'])}")
        for seg_id in ids["seg"]:
            print(f"  SEG: {seg_id}")
        print(f"  browse: {stack.orthanc.rest_url}/studies  (while --keep is running)")
        timings = record.get("timings_s", {})
        print("\nRun record: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        if keep:
            print("\n--keep: services left running; press Ctrl-C to stop them.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        print("\nStopping what the demo started ...")
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the services up until Ctrl-C")
    args = parser.parse_args(argv)
    if args.dir:
        return run_demo(args.dir, args.keep)
    work_dir = Path(tempfile.mkdtemp(prefix="mammo-node-demo-"))
    try:
        return run_demo(work_dir, args.keep)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: a screening study through the whole node, on loopback, then everything stopped.

Starts Redis, an Orthanc playing the PACS (with its DICOMweb plugin), `mammo-node serve`, one
worker and OHIF (tools/stack/viewer.py). The hospital flow: a synthetic 4-view study is stored
in Orthanc first and Orthanc sends it to the node; the SR and SEG objects come back beside the
images. Prints the scores read back from the SR, the Orthanc IDs of what landed and the study's
OHIF URL; `--keep` leaves it all browsable until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from node.drift import normal_exams_flagged
from pipelines.sr import read_sr_scores
from tools.stack.make_study import make_study
from tools.stack.node_stack import NodeStack
from tools.stack.services import OrthancError, exit_on_termination_signals
from tools.stack.viewer import ViewerServer, ohif_installed

# The study the demo's modality sends (tests/unit/test_heatmap_peak.py scores the same one).
DEMO_STUDY = {"rows": 2048, "cols": 1664, "seed": 7, "lesions": ["L-MLO"]}


def _exam_context(bundle_dir: Path, point_name: str) -> str | None:
    """What a suspicious exam verdict at `point_name` means for this bundle, from its card's
    per-exam table: how many normal women's exams that point flagged in its cross-validation."""
    try:
        metadata = json.loads((bundle_dir / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    counts = normal_exams_flagged(metadata, point_name) if isinstance(metadata, dict) else None
    if counts is None:
        return None
    flagged, women = counts
    return (f"  (in the model's cross-validation this point flagged {flagged} of {women} normal "
            "women's exams: see the model card's per-exam table)")


def _print_scores(scores: dict, operating_point: float | None,
                  point_name: str = "balanced", context: str | None = None) -> None:
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
        print(f"  exam at the {point_name} operating point ({operating_point:.3f}): {verdict}")
        if context:
            print(context)
    if scores.get("missing_views"):
        print(f"  views missing: {', '.join(scores['missing_views'])}")
    for mark in scores.get("findings", []):  # regions at or above the operating point
        print(f"  {'finding':<8} {mark['view']:<8} {mark['score'] or 0:>11.3f}  (region peak)")
    caveats = [text for text in scores.get("texts", []) if "declared domain" in text]
    if caveats:  # the SR's own words for the views the model was not trained on
        print("The SR's caveats (this synthetic digital study is not what the model was trained on)")
        for text in caveats:
            print(f"  {text}")
        print("  (in OHIF: those views' SEG series read \"<view> outside domain: ...\" in the list)")
        print("  (for no result at all on such images: scoring.outside_domain: skip in node.yaml)")


def run_demo(work_dir: Path, keep: bool) -> int:
    stack = NodeStack(work_dir, quiet_period_s=5, dicomweb=True)
    viewer: ViewerServer | None = None
    print(f"Starting Redis, Orthanc, the node and a worker under {work_dir} ...")
    started = time.monotonic()
    try:
        stack.start()
        print(f"  Orthanc (PACS)  REST {stack.orthanc.rest_url}  DICOM port {stack.orthanc.dicom_port}"
              f"  DICOMweb {stack.orthanc.dicomweb_url}")
        print(f"  mammo-node      AE MAMMO_NODE on 127.0.0.1:{stack.node_port}")
        if ohif_installed():
            viewer = ViewerServer(stack.orthanc.dicomweb_url).start()
            print(f"  OHIF viewer     {viewer.url}")
        else:
            print("  OHIF viewer     not installed (run `make install`)")
        print(f"  ready in {time.monotonic() - started:.1f} s")
        paths = make_study(work_dir / "study", **DEMO_STUDY)
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        print(f"\nThe modality stores a synthetic 4-view screening study ({len(paths)} images, "
              f"{DEMO_STUDY['rows']} x {DEMO_STUDY['cols']}) in the PACS; the PACS sends it to the node ...",
              flush=True)
        sent_at = time.monotonic()
        try:
            stack.send_through_pacs(paths)
        except OrthancError as err:  # the PACS could not send the study to the node
            print(f"  the PACS could not send the study to the node: {err}", file=sys.stderr)
            return 1
        ids = stack.wait_for_results(study_uid, seg_count=len(paths), timeout_s=300)
        print(f"  results stored in the PACS, beside the images, {time.monotonic() - sent_at:.1f} s "
              "after the PACS sent the study")
        record = stack.wait_for_record(study_uid, timeout_s=30)
        sr = dcmread(io.BytesIO(stack.orthanc.get_instance_file(ids["sr"][0])))
        point_name = record.get("scores", {}).get("operating_point_name", "balanced")
        _print_scores(read_sr_scores(sr), record.get("scores", {}).get("operating_point"),
                      point_name, _exam_context(stack.bundle_dir, point_name))
        print("\nWhere the results landed (Orthanc instance IDs)")
        print(f"  SR : {', '.join(ids['sr'])}")
        for seg_id in ids["seg"]:
            print(f"  SEG: {seg_id}")
        print(f"  browse: {stack.orthanc.rest_url}/studies  (while --keep is running)")
        if viewer is not None:
            print(f"  view the study in OHIF: {viewer.study_url(study_uid)}")
            print("    (double-click the SR to see the findings, the SEG for the suspicious regions)")
        timings = record.get("timings_s", {})
        print("\nRun record: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        if keep:
            print("\n--keep: services left running; Ctrl-C (or SIGTERM) stops them.", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        print("\nStopping what the demo started ...", flush=True)
        if viewer is not None:
            viewer.stop()
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the services up until Ctrl-C")
    args = parser.parse_args(argv)
    exit_on_termination_signals()  # `kill` unwinds like Ctrl-C: everything started is stopped
    try:
        if args.dir:
            return run_demo(args.dir, args.keep)
        work_dir = Path(tempfile.mkdtemp(prefix="mammo-node-demo-"))
        try:
            return run_demo(work_dir, args.keep)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    except KeyboardInterrupt:  # Ctrl-C before the study was through: stopped, no traceback
        print("Interrupted: everything the demo started is stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo` is the first thing a user runs: it must work, print the scores and the study's
viewer URL, leave everything browsable with --keep, and stop everything on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tools.stack.node_stack import DEFAULT_BUNDLE
from tools.stack.viewer import ohif_installed

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 480

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.requires_bin("Orthanc", "redis-server")]


def _get(url: str, accept: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return response.status, response.read()


def test_demo_keeps_the_study_browsable_in_ohif_then_stops_everything_on_ctrl_c(
        tmp_path: Path) -> None:
    if not ohif_installed():
        pytest.fail("OHIF's build is missing: run `make install`", pytrace=False)
    work = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "tools.demo", "--dir", str(work), "--keep"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    keeping = threading.Event()

    def read_output() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("--keep:"):
                keeping.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert keeping.wait(STARTUP_TIMEOUT_S), "".join(lines)[-3000:]
        out = "".join(lines)
        for level in ("view     R-CC", "view     L-MLO", "breast   R", "breast   L", "exam"):
            assert level in out
        assert out.count("SEG: ") == 4 and out.count("SR : ") == 1
        # what the verdict's point means, from the bundle's per-exam table
        assert "exam at the balanced operating point (" in out
        exams = json.loads((DEFAULT_BUNDLE / "metadata.json").read_text())[
            "metrics"]["subgroups"]["exams"]["specificity"]["balanced"]
        assert (f"in the model's cross-validation this point flagged "
                f"{exams['of'] - exams['count']} of {exams['of']} normal women's") in out
        assert "the PACS sends it to the node" in out  # the hospital flow, not storescu
        # the demo's digital CC and MLO views are outside the bundle's declared domain (film MLO),
        # and the SR says so for each of them
        for view_key in ("R-CC", "L-CC", "R-MLO", "L-MLO"):
            assert f"  {view_key}: outside the model's declared domain (" in out, out[-3000:]

        # While --keep runs, the printed URL opens the study in OHIF, and OHIF's DICOMweb
        # (proxied to Orthanc) holds the images and the results side by side in one study.
        [url] = re.findall(r"view the study in OHIF: (\S+)", out)
        [study_uid] = re.findall(r"StudyInstanceUIDs=([0-9.]+)", url)
        status, page = _get(url)
        assert status == 200 and b"app-config.js" in page
        base = url.split("/viewer?")[0]
        status, config = _get(f"{base}/app-config.js")
        assert status == 200 and b"/dicom-web" in config
        status, body = _get(f"{base}/dicom-web/studies/{study_uid}/series", "application/dicom+json")
        modalities = sorted(series["00080060"]["Value"][0] for series in json.loads(body))
        assert modalities.count("MG") == 4 and "SR" in modalities and "SEG" in modalities
    finally:
        if demo.poll() is None:  # Ctrl-C; SIGTERM: tests/integration/test_stop_on_signal.py
            demo.send_signal(signal.SIGINT)
        demo.wait(120)
        reader.join(10)
    out = "".join(lines)
    assert demo.returncode == 0, out[-3000:]
    assert "Stopping what the demo started" in out
    leftovers = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "processes of the demo still running"

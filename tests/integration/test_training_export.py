"""`mammo-node export-training` on studies a real node scored (Redis, `serve`, a worker, Orthanc
as the PACS): a de-identified training set, and a PHI canary over everything the export wrote.

Three canary studies (tests/support/deid_canary.py: every PHI-bearing attribute holds a
recognisable value, UIDs under a made-up organisation root, private tags with text) go through
the node: patient A twice (Latin-1, then UTF-8), patient B once with one view burned in and one
without Burned In Annotation. Once their runs are in done/, the command exports them with an
outcomes CSV; then every byte of every file it wrote, its output and its audit record are
searched for every canary and every source UID.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from node.deid_export import KEY_ENV
from tests.support.deid_canary import (
    ORG_ROOT,
    PATIENT_A,
    PATIENT_B,
    canary_study,
    canary_tokens,
    leaks_in,
    scan_for_canaries,
    source_uids,
)
from tools.model.dataset import load_pixels, read_manifest
from tools.stack.node_stack import ROOT, NodeStack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires_bin("storescu", "echoscu", "Orthanc", "redis-server"),
]

DATES = {"a1": "20190314", "a2": "20200402", "b1": "20210909"}
ACCESSIONS = {"a1": "ACCCANARYA1", "a2": "ACCCANARYA2", "b1": "ACCCANARYB1"}
SITE_KEY = "4f1c2a9e7d3b5a6c8e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b"


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeStack, dict[str, list[Path]]]]:
    """The stack, once the three studies' runs are done."""
    root = tmp_path_factory.mktemp("training-export")
    studies = {
        "a1": canary_study(root / "a1", seed=21, patient=PATIENT_A, accession=ACCESSIONS["a1"],
                           study_date=DATES["a1"], charset="ISO_IR 100"),
        "a2": canary_study(root / "a2", seed=22, patient=PATIENT_A, accession=ACCESSIONS["a2"],
                           study_date=DATES["a2"]),
        "b1": canary_study(root / "b1", seed=23, patient=PATIENT_B, accession=ACCESSIONS["b1"],
                           study_date=DATES["b1"], burned_in={"R-CC": "YES", "L-CC": ""}),
    }
    stack = NodeStack(root / "stack", quiet_period_s=1)
    try:
        stack.start()
        for paths in studies.values():
            sent = stack.storescu(paths)
            assert sent.returncode == 0, sent.stderr
        for key, paths in studies.items():
            study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            record = stack.wait_for_record(study_uid, timeout_s=240)
            assert record["state"] == "done", (key, record)
        yield stack, studies
    finally:
        stack.stop()


@dataclass(frozen=True)
class Exported:
    out: Path
    stdout: bytes
    stderr: bytes
    audit_added: bytes


@pytest.fixture(scope="module")
def export(scored: tuple[NodeStack, dict[str, list[Path]]], tmp_path_factory: pytest.TempPathFactory
           ) -> Exported:
    """`mammo-node export-training` run as a user runs it; what it printed and appended."""
    stack, _ = scored
    root = tmp_path_factory.mktemp("export")
    outcomes = root / "outcomes.csv"
    outcomes.write_text("study_uid,accession_number,label,malignant,laterality\n"
                        f"{ORG_ROOT}.21.1,,1,1,L\n"
                        f"{ORG_ROOT}.21.1,,0,0,\n"
                        f",{ACCESSIONS['b1']},0,0,\n", encoding="utf-8")
    audit = stack.spool_dir / "audit.jsonl"
    audit_before = audit.read_bytes()
    out = root / "out"
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "export-training", "--config", str(stack.config_path),
         "--out", str(out), "--outcomes", str(outcomes)],
        cwd=ROOT, env={**stack.env(), KEY_ENV: SITE_KEY}, capture_output=True, timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    audit_after = audit.read_bytes()
    assert audit_after.startswith(audit_before)
    return Exported(out, result.stdout, result.stderr, audit_after[len(audit_before):])


def test_the_scored_studies_are_exported_with_labels_and_the_node_scores(
        scored: tuple[NodeStack, dict[str, list[Path]]], export: Exported) -> None:
    stack, _ = scored
    out = export.out
    counts = json.loads(export.stdout.decode().splitlines()[0])
    assert (counts["studies_exported"], counts["images_exported"], counts["patients"]) == (3, 10, 2)
    assert counts["refused_images"] == {"burned_in_annotation_missing": 1,
                                        "burned_in_annotation_yes": 1}
    assert (counts["labelled_images"], counts["unlabelled_images"]) == (6, 4)
    lines = [json.loads(t) for name in ("labelled.jsonl", "unlabelled.jsonl")
             for t in (out / name).read_text().splitlines()]
    # One woman per patient: A's two studies share their pseudonym, B has another.
    studies_of_group: dict[str, set[str]] = {}
    for line in lines:
        studies_of_group.setdefault(line["group"], set()).add(line["study"])
    assert sorted(len(s) for s in studies_of_group.values()) == [1, 2]
    # The node's scores travel as columns: each study's exam and view scores are its record's.
    records = {round(r["scores"]["exam"], 9): r["scores"] for r in stack.records("done")}
    assert len(records) == 3
    for line in lines:
        scores = records[round(line["node_exam_score"], 9)]
        assert line["node_view_score"] == scores["views"][f"{line['laterality']}-{line['view']}"]
        assert line["node_model"] and line["node_breast_score"] == scores["breasts"][line["laterality"]]
    # The labelled manifest is what tools/model reads: labels by breast, pixels load.
    manifest = read_manifest(out / "labelled.jsonl")
    assert {(r.laterality, r.label, r.malignant) for r in manifest} == {
        ("L", 1, 1), ("R", 0, 0), ("L", 0, 0)}
    for record in manifest:
        ds = dcmread(record.image, stop_before_pixels=True)
        assert load_pixels(record).shape == (ds.Rows, ds.Columns)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID == record.group


def test_no_canary_in_anything_the_export_wrote(
        scored: tuple[NodeStack, dict[str, list[Path]]], export: Exported) -> None:
    stack, studies = scored
    out = export.out
    tokens = canary_tokens([PATIENT_A, PATIENT_B], ACCESSIONS.values(), DATES.values())
    tokens += sorted(source_uids(p for paths in studies.values() for p in paths))
    leaks, searched = scan_for_canaries(out, tokens)
    assert leaks == []
    assert len([p for p in searched if p.suffix == ".dcm"]) == 10
    printed = {"stdout": export.stdout, "stderr": export.stderr, "audit": export.audit_added}
    for name, blob in printed.items():
        assert leaks_in(blob, name, tokens) == []
    audit = [json.loads(t) for t in export.audit_added.decode().splitlines()]
    assert [a["event"] for a in audit] == ["training_set_exported"]
    assert audit[0]["images_exported"] == 10
    everything = b"".join([*(p.read_bytes() for p in searched), *printed.values()])
    assert SITE_KEY.encode() not in everything
    # The detector sees what it looks for: the spool's received files are full of canaries.
    received, _ = scan_for_canaries(stack.spool_dir / "done", [PATIENT_A.family, ORG_ROOT])
    assert received

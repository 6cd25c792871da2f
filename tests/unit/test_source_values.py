"""Any valid source values: the results are written and carry the study's values as received.

Each case changes the patient and study values of a synthetic study (tools/stack/make_study.py),
writes every kind of object (TID 1500 SR, SEG, Mammography CAD SR, Secondary Capture overlay)
through the same builders the worker uses, reads them back as bytes and
compares every carried value with the source's; dciodvfy judges each object, dcentvfy the study
with its results (the values must agree across the study, which is what a PACS matches on).
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from pipelines.cad_sr import build_cad_sr
from pipelines.overlay import build_overlay
from pipelines.results import OutputSpec
from pipelines.seg import build_binary_seg
from pipelines.source_values import CARRIED_KEYWORDS, carry_source_values, highdicom_safe
from pipelines.sr import build_sr
from tests.support.dciodvfy import run_dciodvfy, to_bytes
from tests.unit.test_sr import ALLOWED_WARNINGS, MODEL, SPEC, _result
from tools.stack.make_study import make_study
from tools.stack.services import find_binary

pytestmark = pytest.mark.requires_bin("dciodvfy", "dcentvfy")

SEG_SPEC = OutputSpec(9902, "AI suspicious regions", uid_root=SPEC.uid_root)
CAD_SR_SPEC = OutputSpec(9903, "AI mammography CAD report", uid_root=SPEC.uid_root)
SC_SPEC = OutputSpec(9905, "AI overlay", uid_root=SPEC.uid_root)
# Warnings a case may add, with the reason we keep them.
CASE_WARNINGS = {
    # The source has no Study ID; its results carry that faithfully (empty, as type 2 allows).
    "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID",
}


def _multi_valued_name(ds: Dataset) -> None:
    """Two values in Patient's Name (a merged record, or an alias), as the issue's study had."""
    ds.PatientName = ["Doe^Jane", "Roe^Jane"]


def _utf8_names(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller-Lüdenscheidt^Zoë^Åsa=王^小東"
    ds.ReferringPhysicianName = "Ñúñez^José"
    ds.StudyDescription = "Mammographie de dépistage – bilatérale"


def _japanese_iso_2022(ds: Dataset) -> None:
    """PS3.5 H.3.1: alphabetic, ideographic (kanji) and phonetic (hiragana) groups, JIS X 0208."""
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.StudyDescription = "乳房撮影"


def _long_and_odd_strings(ds: Dataset) -> None:
    ds.PatientName = "O'Brien-Smith von der Heide^Anne-Marie^^Dr.^PhD"
    ds.PatientID = "ID/2026#0001 & (temp) 'x' = y; z: " + "9" * 30  # LO: 64 characters
    ds.AccessionNumber = "ACC/26-000.0001"  # SH: at most 16
    ds.StudyID = "S-0000000000001"
    ds.StudyDescription = "X" * 64
    ds.ReferringPhysicianName = "^^^^"  # only delimiters: an empty name in five components


LEFT_OUT = ("AccessionNumber", "StudyID", "PatientBirthDate", "ReferringPhysicianName",
            "PatientSex")


def _missing_optional(ds: Dataset) -> None:
    for keyword in LEFT_OUT:
        if keyword in ds:
            delattr(ds, keyword)


CASES: dict[str, Callable[[Dataset], None]] = {
    "multi-valued-name": _multi_valued_name,
    "utf8": _utf8_names,
    "japanese-iso-2022": _japanese_iso_2022,
    "long-and-odd": _long_and_odd_strings,
    "missing-optional": _missing_optional,
}


# dcentvfy warnings (across the study and its results) we keep, with the reason.
DCENTVFY_ALLOWED = {
    # dicom3tools files Accession Number under a Series-level module in some IODs and under the
    # Study in others; the values are the same (compared above), only its table differs.
    "Warning - Different information entities for attribute - Element=<AccessionNumber>",
}
# The case that leaves type 2 values out of the source: our SR and SEG must have them (empty).
DCENTVFY_ALLOWED_LEFT_OUT = {
    f"Warning - Attribute present in one instance but not the other - Element=<{keyword}>"
    for keyword in LEFT_OUT
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_study(tmp_path_factory.mktemp("study"), rows=128, cols=104, seed=5)


def _errors(path: Path) -> set[str]:
    return set(run_dciodvfy(path)[0])


def _dcentvfy(paths: list[Path]) -> list[str]:
    result = subprocess.run([find_binary("dcentvfy"), *map(str, paths)], capture_output=True,
                            text=True, check=False, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(("Error", "Warning"))]


@pytest.mark.parametrize("case", list(CASES))
def test_results_carry_the_source_values(case: str, study: list[Path], tmp_path: Path) -> None:
    sources_in = []
    for index, path in enumerate(study):
        ds = dcmread(path)
        CASES[case](ds)
        changed = tmp_path / f"source-{index}.dcm"
        ds.save_as(changed, enforce_file_format=True)
        sources_in.append(changed)
    sources = [dcmread(p) for p in sources_in]  # decoded with their own character set
    heatmaps = {str(s.SOPInstanceUID): np.zeros((int(s.Rows), int(s.Columns)), np.float32)
                for s in sources}
    first_heatmap = heatmaps[str(sources[0].SOPInstanceUID)]
    objects = {
        "sr": build_sr(sources, _result(sources), MODEL, SPEC, heatmaps=heatmaps),
        "seg": build_binary_seg(sources[0], (), MODEL, SEG_SPEC),
        "cad-sr": build_cad_sr(sources, _result(sources), [()] * len(sources), MODEL,
                               CAD_SR_SPEC),
        "sc": build_overlay(sources[0], sources[0].pixel_array.astype(np.float32), first_heatmap,
                            (), MODEL, SC_SPEC, max_side_px=64),
    }
    written = {name: tmp_path / f"{name}.dcm" for name in objects}
    for name, dataset in objects.items():
        written[name].write_bytes(to_bytes(dataset))

    source = sources[0]
    for name, path in written.items():
        result = dcmread(path)
        for keyword in CARRIED_KEYWORDS:
            if keyword in source:
                assert result[keyword].VR == source[keyword].VR, (name, keyword)
                assert result[keyword].value == source[keyword].value, (name, keyword)
            elif keyword in result:  # type 2 in our objects: present and empty
                assert result[keyword].value in (None, "", []), (name, keyword)
        assert result.get("SpecificCharacterSet") == source.get("SpecificCharacterSet"), name
        # The results add no error of their own; any the source has in a carried value (two
        # values in Patient's Name, whose VM is 1) they inherit, so they still match their study.
        source_errors = _errors(sources_in[0])
        new = [e for e in _errors(path) if e not in source_errors]
        assert new == [], (name, new)
        warnings = run_dciodvfy(path)[1]
        assert [w for w in warnings if w not in ALLOWED_WARNINGS | CASE_WARNINGS] == [], name
    allowed = DCENTVFY_ALLOWED | (DCENTVFY_ALLOWED_LEFT_OUT if case == "missing-optional"
                                  else set())
    unexpected = [w for w in _dcentvfy([*sources_in, *written.values()])
                  if not any(w.startswith(prefix) for prefix in allowed)]
    assert unexpected == []


def test_the_highdicom_copy_leaves_the_source_alone(study: list[Path]) -> None:
    source = dcmread(study[0])
    _multi_valued_name(source)
    del source.AccessionNumber
    del source.SpecificCharacterSet  # plain ASCII values need none
    safe = highdicom_safe(source)
    assert str(safe.PatientName) == "Doe^Jane" and safe.AccessionNumber in (None, "")
    assert [str(name) for name in source.PatientName] == ["Doe^Jane", "Roe^Jane"]
    assert "AccessionNumber" not in source
    target = Dataset()
    target.SpecificCharacterSet = "ISO_IR 100"
    carry_source_values(source, target)
    assert [str(name) for name in target.PatientName] == ["Doe^Jane", "Roe^Jane"]
    assert "SpecificCharacterSet" not in target  # the source's values are plain ASCII
    assert "AccessionNumber" not in target


def test_the_japanese_name_goes_out_in_its_own_character_set(study: list[Path],
                                                               tmp_path: Path) -> None:
    """The bytes on the wire use ISO 2022 escapes (ESC $ B), not UTF-8, as the source declared."""
    source = dcmread(study[0])
    _japanese_iso_2022(source)
    source = dcmread(io.BytesIO(to_bytes(source)))
    seg = build_binary_seg(source, (), MODEL, SEG_SPEC)
    data = to_bytes(seg)
    assert b"\x1b$B" in data and "山田".encode() not in data
    assert str(dcmread(io.BytesIO(data)).PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"

"""Pipelines per called AE title and the shadow bundle: the pure parts (settings, admission,
config check, spool keys, records, the worker's shadow scoring, the comparison report)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from node.admission import admission_rejection
from node.cli import main
from node.config_check import offline_problems
from node.errors import ConfigError
from node.runs import (
    MANIFEST_NAME,
    InstanceEntry,
    ModelRef,
    RunRecord,
    Scores,
    ShadowScores,
    read_manifest,
    read_record,
    write_record,
)
from node.shadow_report import auc, compare, read_outcomes, spearman
from node.spool import Spool, hash_key, study_key
from node.vocabulary import (
    REJECT_CALLED_AE_NOT_RECOGNISED,
    REJECT_CALLING_AE_NOT_RECOGNISED,
    STORAGE_SOP_CLASSES,
    storage_sop_classes_named,
)
from pipelines.results import ModelIdentity
from pipelines.scoring import process_run
from pipelines.shadow import Shadow
from tests.support.bundles import renamed_bundle
from tests.support.settings import config_data, make_settings, write_config
from tools.stack.make_study import make_study

ENV = {"MAMMO_BROKER_PASSWORD": "set"}


def _destinations() -> list[dict[str, Any]]:
    return [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 105}]


def _pipelines(tmp_path: Path, **screen: Any) -> list[dict[str, Any]]:
    return [
        {"name": "screen", "ae_title": "MAMMO_SCREEN",
         "allowed_callers": [{"ae_title": "MODALITY", "host": "127.0.0.1"}],
         "model": {"bundle_dir": str(tmp_path / "screen-bundle")}, "destinations": ["pacs"],
         **screen},
        {"name": "research", "ae_title": "MAMMO_RESEARCH",
         "allowed_callers": [{"ae_title": "RESEARCH"}],
         "sop_classes": ["DigitalMammographyXRayImageStorageForPresentation"],
         "completion": {"quiet_period_s": 5, "deadline_s": 50},
         "model": {"bundle_dir": str(tmp_path / "research-bundle")}, "destinations": ["archive"]},
    ]


def _settings(tmp_path: Path, **screen: Any) -> Any:
    return make_settings(tmp_path, allowed_callers=[], destinations=_destinations(),
                         pipelines=_pipelines(tmp_path, **screen))


# --- settings -------------------------------------------------------------------------------------
def test_a_config_without_pipelines_is_one_implicit_pipeline(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, destinations=_destinations())
    [pipeline] = settings.pipeline_list
    assert pipeline.implicit and pipeline.name == "default"
    assert pipeline.ae_title == settings.node.ae_title
    assert pipeline.allowed_callers == tuple(settings.allowed_callers)
    assert pipeline.queue == settings.broker.queue
    assert pipeline.model == settings.model and pipeline.sop_classes is None
    assert settings.for_pipeline(None) is settings
    assert settings.pipeline_of_called_ae("OTHER") is None


def test_each_pipeline_gets_its_model_completion_and_destinations(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    screen, research = settings.pipeline_list
    assert (screen.queue, research.queue) == ("mammo.screen", "mammo.research")
    assert screen.completion == settings.completion  # the top-level rule when not overridden
    assert research.completion.quiet_period_s == 5
    view = settings.for_pipeline("research")
    assert view.model.bundle_dir == tmp_path / "research-bundle"
    assert [d.name for d in view.all_destinations] == ["archive"]
    assert view.completion.quiet_period_s == 5
    assert [d.name for d in settings.for_pipeline("screen").all_destinations] == ["pacs"]
    with pytest.raises(KeyError):
        settings.for_pipeline("default")  # named pipelines replace the implicit one


def test_each_pipeline_may_have_its_own_outside_domain_policy(tmp_path: Path) -> None:
    """`pipelines[].outside_domain` overrides `scoring.outside_domain` for that pipeline's
    worker; the others keep the top-level one; `config check` names a skipping pipeline whose
    bundle declares no domain."""
    from tools.stack.node_stack import DEFAULT_BUNDLE

    settings = _settings(tmp_path, outside_domain="skip")
    screen, research = settings.pipeline_list
    assert (screen.outside_domain, research.outside_domain) == ("skip", "score")
    assert settings.for_pipeline("screen").scoring.outside_domain == "skip"
    assert settings.for_pipeline("research").scoring.outside_domain == "score"
    everywhere = make_settings(tmp_path, allowed_callers=[], destinations=_destinations(),
                               pipelines=_pipelines(tmp_path), scoring={"outside_domain": "skip"})
    assert {p.outside_domain for p in everywhere.pipeline_list} == {"skip"}

    bare = tmp_path / "bare-bundle"
    renamed_bundle(bare, "mias-bare", "0.0.1")
    metadata = json.loads((bare / "metadata.json").read_text())
    del metadata["domain"]
    (bare / "metadata.json").write_text(json.dumps(metadata))
    pipelines = _pipelines(tmp_path, outside_domain="skip")
    pipelines[0]["model"] = {"bundle_dir": str(bare)}
    pipelines[1]["model"] = {"bundle_dir": str(bare)}  # scores: no problem
    checked = make_settings(tmp_path, destinations=_destinations(), pipelines=pipelines)
    assert offline_problems(checked, ENV) == [
        "pipelines[0].model.bundle_dir: outside_domain is skip, but the bundle's metadata.json "
        "declares no domain: every image would be scored"]
    pipelines[0]["model"] = {"bundle_dir": str(DEFAULT_BUNDLE)}
    assert offline_problems(make_settings(tmp_path, destinations=_destinations(),
                                          pipelines=pipelines), ENV) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p[1].update(ae_title="MAMMO_SCREEN"), "ae_title must be unique"),
        (lambda p: p[1].update(name="screen"), "name must be unique"),
        (lambda p: p[0].update(destinations=["nowhere"]), "unknown destination(s) ['nowhere']"),
        (lambda p: p[0].update(name="default"), "reserved"),
        (lambda p: p[0].update(allowed_callers=[]), "pipelines.0.allowed_callers"),
    ],
)
def test_bad_pipelines_name_the_problem(tmp_path: Path, change: Any, expected: str) -> None:
    pipelines = _pipelines(tmp_path)
    change(pipelines)
    with pytest.raises(ConfigError) as error:
        make_settings(tmp_path, destinations=_destinations(), pipelines=pipelines)
    assert expected in str(error.value)


def test_callers_are_needed_somewhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        make_settings(tmp_path, allowed_callers=[])
    assert "config: allowed_callers: at least one caller is needed" in str(error.value)
    with pytest.raises(ConfigError, match="set shadow_model in the pipeline"):
        make_settings(tmp_path, destinations=_destinations(), pipelines=_pipelines(tmp_path),
                      shadow_model={"bundle_dir": "x"})


def test_relative_bundle_paths_are_taken_from_the_config_file(tmp_path: Path) -> None:
    from node.settings import load_settings

    pipelines = _pipelines(tmp_path, shadow_model={"bundle_dir": "bundles/candidate"})
    pipelines[0]["model"] = {"bundle_dir": "bundles/live"}
    path = write_config(tmp_path / "etc" / "node.yaml", destinations=_destinations(),
                        pipelines=pipelines)
    screen = load_settings(path).pipeline("screen")
    assert screen is not None and screen.shadow_model is not None
    assert screen.model.bundle_dir == tmp_path / "etc" / "bundles" / "live"
    assert screen.shadow_model.bundle_dir == tmp_path / "etc" / "bundles" / "candidate"


# --- admission ------------------------------------------------------------------------------------
def test_a_caller_is_admitted_only_by_its_own_pipelines_ae_title(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert admission_rejection(settings, "MODALITY", "MAMMO_SCREEN", "127.0.0.1") is None
    assert admission_rejection(settings, "RESEARCH", "MAMMO_RESEARCH", "10.0.0.1") is None
    assert admission_rejection(settings, "MODALITY", "MAMMO_RESEARCH", "127.0.0.1") == (
        REJECT_CALLING_AE_NOT_RECOGNISED, "calling_ae_title_not_recognised")
    assert admission_rejection(settings, "RESEARCH", "MAMMO_SCREEN", "127.0.0.1") == (
        REJECT_CALLING_AE_NOT_RECOGNISED, "calling_ae_title_not_recognised")
    # node.ae_title is not a called AE title of its own once pipelines are configured
    assert admission_rejection(settings, "MODALITY", settings.node.ae_title, "127.0.0.1") == (
        REJECT_CALLED_AE_NOT_RECOGNISED, "called_ae_title_not_recognised")


def test_sop_classes_by_keyword_or_uid(tmp_path: Path) -> None:
    presentation, processing, _ = STORAGE_SOP_CLASSES
    assert storage_sop_classes_named(None) == STORAGE_SOP_CLASSES
    assert storage_sop_classes_named((presentation.keyword, str(processing))) == (
        presentation, processing)
    with pytest.raises(ValueError, match="CTImageStorage"):
        storage_sop_classes_named(("CTImageStorage",))


# --- config check ---------------------------------------------------------------------------------
def test_config_check_names_each_pipelines_bundle_and_sop_classes(tmp_path: Path) -> None:
    from tools.stack.node_stack import DEFAULT_BUNDLE

    pipelines = _pipelines(tmp_path, shadow_model={"bundle_dir": str(tmp_path / "missing")})
    pipelines[0]["model"] = {"bundle_dir": str(DEFAULT_BUNDLE)}
    pipelines[1]["sop_classes"] = ["CTImageStorage"]
    settings = make_settings(tmp_path, destinations=_destinations(), pipelines=pipelines)
    problems = offline_problems(settings, ENV)
    assert [p.split(":")[0] for p in problems] == [
        "pipelines[0].shadow_model.bundle_dir", "pipelines[1].model.bundle_dir",
        "pipelines[1].sop_classes"]
    assert "folder not found" in problems[0]

    # Promotion: the candidate becomes `model`, and is checked like any live bundle.
    renamed_bundle(tmp_path / "candidate", "mias-candidate", "0.3.0")
    pipelines[0] = {**pipelines[0], "model": {"bundle_dir": str(tmp_path / "candidate")},
                    "shadow_model": None}
    pipelines[1] = {**pipelines[1], "model": {"bundle_dir": str(DEFAULT_BUNDLE)},
                    "sop_classes": None}
    promoted = make_settings(tmp_path, destinations=_destinations(), pipelines=pipelines)
    assert offline_problems(promoted, ENV) == []
    metadata = tmp_path / "candidate" / "metadata.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "model_sha256": "0" * 64}))
    [problem] = offline_problems(promoted, ENV)
    assert problem.startswith("pipelines[0].model.bundle_dir:") and "does not match" in problem


def test_config_check_command_lists_the_pipelines(tmp_path: Path, capsys: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.stack.node_stack import DEFAULT_BUNDLE

    monkeypatch.setenv("MAMMO_BROKER_PASSWORD", "set")
    pipelines = _pipelines(tmp_path)
    for pipeline in pipelines:
        pipeline["model"] = {"bundle_dir": str(DEFAULT_BUNDLE)}
    path = write_config(tmp_path / "node.yaml", destinations=_destinations(), pipelines=pipelines)
    assert main(["config", "check", str(path)]) == 0
    assert ("2 pipeline(s): screen = ae_title MAMMO_SCREEN, research = ae_title MAMMO_RESEARCH"
            in capsys.readouterr().out)
    pipelines[1]["sop_classes"] = ["Nonsense"]
    write_config(tmp_path / "node.yaml", destinations=_destinations(), pipelines=pipelines)
    assert main(["config", "check", "--schema-only", str(path)]) == 2
    assert "pipelines[1].sop_classes: not storage SOP classes" in capsys.readouterr().err


# --- spool and records ----------------------------------------------------------------------------
def _entry(sop_uid: str, pipeline: str = "") -> InstanceEntry:
    study_uid = "1.2.826.0.1.3680043.10.1.7"
    return InstanceEntry(sop_uid, str(STORAGE_SOP_CLASSES[0]), study_uid + ".1", study_uid,
                         "1.2.840.10008.1.2.1", "R", "CC", hash_key(sop_uid) + ".dcm", 4, 1.0,
                         "a", "MODALITY", pipeline)


def test_the_same_study_in_two_pipelines_is_two_studies_and_two_runs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    for pipeline in ("", "screen", "research"):
        received = spool.tmp_dir / "x.part"
        received.write_bytes(b"DICM")
        spool.add_instance(received, _entry("1.2.826.0.1.3680043.10.1.7.5", pipeline))
    studies = {s.pipeline: s for s in spool.incoming_studies()}
    assert set(studies) == {"", "screen", "research"}
    assert studies[""].study_key == hash_key("1.2.826.0.1.3680043.10.1.7")  # as it always was
    assert studies["screen"].study_key == study_key("1.2.826.0.1.3680043.10.1.7", "screen")
    implicit_line = json.loads((spool.incoming_dir / studies[""].study_key / MANIFEST_NAME)
                               .read_text())
    assert "pipeline" not in implicit_line  # the implicit pipeline's manifest is unchanged
    run_id = spool.claim_study(studies["screen"].study_key, "quiet_period")
    info = spool.run_info(run_id)
    assert info is not None and info.pipeline == "screen" and info.supersedes == ()
    implicit_run = spool.run_info(spool.claim_study(studies[""].study_key, "quiet_period"))
    assert implicit_run is not None and implicit_run.pipeline is None


def test_old_manifests_and_records_load(tmp_path: Path) -> None:
    old = asdict(_entry("1.2.826.0.1.3680043.10.1.7.6"))
    del old["pipeline"], old["calling_ae"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old) + "\n")
    [entry] = read_manifest(tmp_path)
    assert entry.pipeline == "" and entry.calling_ae == ""
    write_record(tmp_path, RunRecord(run_id="r", study_uid="1.2.3", state="done"))
    assert "shadow" not in (tmp_path / "record.json").read_text()
    record = read_record(tmp_path)
    assert record is not None and record.shadow is None and record.pipeline is None


# --- the worker's shadow --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prediction:
    probability: float
    heatmap: np.ndarray


class _Fixed:
    last_timings_s: dict[str, float] = {}

    def __init__(self, name: str, probability: float, operating_point: float = 0.5) -> None:
        self.identity = ModelIdentity(name, "1", operating_point)
        self.probability = probability
        self.calls = 0

    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        self.calls += 1
        return [_Prediction(self.probability, np.zeros(np.shape(i), np.float32)) for i in images]


class _Broken(_Fixed):
    def predict(self, images: list[np.ndarray]) -> list[_Prediction]:
        raise RuntimeError("candidate exploded")


def _claim(spool: Spool, tmp_path: Path, pipeline: str, seed: int) -> str:
    for path in make_study(tmp_path / f"study-{seed}", views=["R-CC", "L-CC"], rows=64, cols=48,
                           seed=seed):
        ds = dcmread(path, stop_before_pixels=True)
        received = spool.tmp_dir / "received.part"
        received.write_bytes(path.read_bytes())
        spool.add_instance(received, InstanceEntry(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID),
            str(ds.ImageLaterality), str(ds.ViewPosition),
            hash_key(str(ds.SOPInstanceUID)) + ".dcm", path.stat().st_size, 1.0, "a", "M",
            pipeline))
    [study] = [s for s in spool.incoming_studies() if s.pipeline == pipeline]
    return spool.claim_study(study.study_key, "quiet_period")


def test_the_shadow_scores_beside_the_live_model_and_never_fails_the_run(tmp_path: Path) -> None:
    config = make_settings(tmp_path, allowed_callers=[], pipelines=_pipelines(tmp_path),
                           destinations=_destinations())
    settings = config.for_pipeline("screen").model_copy(
        update={"destinations": [], "dicomweb_destinations": []})  # nothing to send to here
    spool = Spool(settings.spool.dir).ensure()
    outputs_before = 0

    run_id = _claim(spool, tmp_path, "screen", 21)
    live, candidate = _Fixed("live", 0.7), _Fixed("candidate", 0.4, operating_point=0.3)
    assert process_run(settings, spool, run_id, live, pipeline="screen",
                       shadow=Shadow(candidate)) == "done"
    record = read_record(spool.state_dir("done") / run_id)
    assert record is not None and record.scores is not None and record.shadow is not None
    assert record.pipeline == "screen"
    assert record.model == ModelRef(name="live", version="1")
    assert record.shadow.model == ModelRef(name="candidate", version="1")
    assert record.shadow.scores is not None and record.shadow.error is None
    assert record.shadow.scores.exam == pytest.approx(0.4)
    assert record.shadow.scores.suspicious  # at its own operating point (0.3)
    assert record.scores.exam == pytest.approx(0.7)
    # Only the live model's objects were written.
    outputs = sorted(p.name for p in (spool.state_dir("done") / run_id / "outputs").iterdir())
    assert len(outputs) > outputs_before and record.outputs is not None
    assert outputs == sorted(Path(o.file).name for o in record.outputs)

    broken = _claim(spool, tmp_path, "screen", 22)
    assert process_run(settings, spool, broken, _Fixed("live", 0.7), pipeline="screen",
                       shadow=Shadow(_Broken("candidate", 0.0))) == "done"
    record = read_record(spool.state_dir("done") / broken)
    assert record is not None and record.scores is not None and record.shadow is not None
    assert record.shadow.error == "RuntimeError: candidate exploded"
    assert record.shadow.scores is None

    unloadable = _claim(spool, tmp_path, "screen", 23)
    assert process_run(settings, spool, unloadable, _Fixed("live", 0.7), pipeline="screen",
                       shadow=Shadow(None, "shadow model not loaded: ModelError: x")) == "done"
    record = read_record(spool.state_dir("done") / unloadable)
    assert record is not None and record.shadow == ShadowScores(
        error="shadow model not loaded: ModelError: x")


def test_a_worker_leaves_the_runs_of_another_pipeline_alone(tmp_path: Path) -> None:
    config = make_settings(tmp_path, allowed_callers=[], pipelines=_pipelines(tmp_path),
                           destinations=_destinations())
    spool = Spool(config.spool.dir).ensure()
    run_id = _claim(spool, tmp_path, "research", 24)
    model = _Fixed("live", 0.7)
    assert process_run(config.for_pipeline("screen"), spool, run_id, model,
                       pipeline="screen") is None
    assert spool.runs("queued") == [run_id] and model.calls == 0


# --- the report -----------------------------------------------------------------------------------
def test_rank_correlation_and_auc() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # ties share their average rank (the value scipy.stats.spearmanr gives)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833)
    assert auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert auc([0.1, 0.8, 0.3, 0.5], [1, 1, 0, 0]) == 0.5
    assert auc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts half
    assert auc([0.5, 0.6], [1, 1]) is None


def _record(run_id: str, study_uid: str, live: float, shadow: float | None,
            pipeline: str | None = "screen") -> RunRecord:
    def scores(exam: float, operating_point: float) -> Scores:
        return Scores(views={"R-CC": exam}, breasts={"R": exam}, exam=exam,
                      operating_point=operating_point, suspicious=exam >= operating_point)

    shadow_scores = (ShadowScores(error="RuntimeError: x") if shadow is None else
                     ShadowScores(model=ModelRef(name="candidate", version="2"),
                                  scores=scores(shadow, 0.4)))
    return RunRecord(run_id=run_id, study_uid=study_uid, state="done", pipeline=pipeline,
                     model=ModelRef(name="live", version="1"), scores=scores(live, 0.5),
                     shadow=shadow_scores)


def test_shadow_report_from_the_records(tmp_path: Path, capsys: Any) -> None:
    path = write_config(tmp_path / "node.yaml", destinations=_destinations(),
                        pipelines=_pipelines(tmp_path))
    spool = Spool(tmp_path / "spool").ensure()
    rows = [("r1", "1.2.1", 0.9, 0.8), ("r2", "1.2.2", 0.6, 0.3), ("r3", "1.2.3", 0.2, 0.1),
            ("r4", "1.2.4", 0.1, 0.2), ("r0", "1.2.1", 0.0, 0.0),  # superseded by r1
            ("r5", "1.2.5", 0.5, None)]
    for run_id, study_uid, live, shadow in rows:
        folder = spool.state_dir("done") / run_id
        folder.mkdir()
        write_record(folder, _record(run_id, study_uid, live, shadow))
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("study_uid,label\n1.2.1,1\n1.2.2,0\n1.2.3,1\n1.2.4,0\n")

    assert main(["shadow", "report", "--config", str(path), "--outcomes", str(outcomes),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shadow_errors"] == {"screen": 1}
    [comparison] = report["comparisons"]
    assert comparison["studies"] == 4
    # verdicts: r1 both, r2 live only (0.6 >= 0.5, 0.3 < 0.4), r3 and r4 neither
    assert comparison["verdicts"] == {"both_suspicious": 1, "live_only": 1, "shadow_only": 0,
                                      "neither": 2}
    assert comparison["agreement"] == 0.75
    assert comparison["exam_mean_abs_diff"] == pytest.approx((0.1 + 0.3 + 0.1 + 0.1) / 4)
    assert comparison["exam_spearman"] == pytest.approx(0.8)
    assert comparison["live_auc"] == 0.75 and comparison["shadow_auc"] == 0.5

    assert main(["shadow", "report", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "pipeline screen: live live 1 vs shadow candidate 2, 4 studies" in text
    assert "agreement (verdict at each model's operating point): 0.750" in text
    assert "1 run(s) with a shadow error" in text

    outcomes.write_text("study_uid,label\n1.2.1,yes\n")
    assert main(["shadow", "report", "--config", str(path), "--outcomes", str(outcomes)]) == 2
    assert "row 2: needs study_uid and label 0 or 1" in capsys.readouterr().err
    with pytest.raises(ValueError):
        read_outcomes(tmp_path / "absent.csv")


def test_shadow_report_says_when_there_is_nothing_to_compare(tmp_path: Path, capsys: Any) -> None:
    path = write_config(tmp_path / "node.yaml")
    Spool(tmp_path / "spool").ensure()
    assert main(["shadow", "report", "--config", str(path)]) == 1
    assert "no finished run has both live and shadow scores" in capsys.readouterr().err
    assert compare([]) == []
    assert config_data(tmp_path)["allowed_callers"]  # the base config keeps its caller

"""tools/model/tuned.py: a bundle on a fine-tuned trunk takes its metrics from the outer folds
of the same schedule, and refuses inputs that do not belong together (the real build needs
mini-MIAS and an hour of training: its output is the committed bundle's tests' business)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tools.model import topfit, tuned

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "mias-baseline"
IDS = ["mdb001", "mdb002", "mdb003", "mdb004"]


def _outer(repeat: int, recipes: str, auc: float, hits: list[int]) -> dict[str, Any]:
    arm = {"auc": auc, "auc_ci95": [auc - 0.1, auc + 0.05], "hits": hits,
           "malignant_auc": auc - 0.02, "malignant_auc_ci95": [auc - 0.15, auc + 0.05]}
    frozen = {**arm, "auc": auc - 0.01, "hits": [hits[0] - 1, hits[1]]}
    return {"repeat": repeat, "seed": 20261130 + repeat, "folds": 2, "recipes": recipes,
            "features": "build/cells/lite0",
            "ids": IDS, "schedule": topfit.schedule_of("all", 6),
            "summary": {tuned.ARM: arm, "frozen shipped": frozen},
            "per_fold": [{"recipe": {"level": "16c"}, tuned.ARM: {"auc": 0.7}},
                         {"recipe": {"level": "32"}, tuned.ARM: {"auc": 0.8}}]}


def _inputs() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    trunk_run = {"sha256": "ab" * 32, "ids": IDS, "schedule": topfit.schedule_of("all", 6)}
    info = {"trunk": {"sha256": "ab" * 32}, "vflip": False}
    return info, trunk_run, [_outer(0, "inner", 0.78, [10, 20]), _outer(1, "shipped", 0.76,
                                                                        [12, 20])]


def test_matching_inputs_pass() -> None:
    info, trunk_run, outer = _inputs()
    tuned.check_inputs(info, trunk_run, "ab" * 32, outer, IDS)


@pytest.mark.parametrize(("change", "message"), [
    (lambda i, t, o: t.update(sha256="cd" * 32), "trunk.json"),
    (lambda i, t, o: i.update(trunk=None), "extracted through this trunk"),
    (lambda i, t, o: i.update(vflip=True), "mirrors"),
    (lambda i, t, o: t.update(ids=IDS[::-1]), "trunk was trained on other films"),
    (lambda i, t, o: o[1].update(ids=IDS[:3]), "repeat 1"),
    (lambda i, t, o: o[0]["schedule"].update(epochs=3), "another schedule"),
    (lambda i, t, o: o[0].update(recipes="shipped"), "--recipes inner"),
    (lambda i, t, o: o.reverse(), "in order"),
])
def test_inputs_that_do_not_belong_together_are_refused(change, message: str) -> None:
    info, trunk_run, outer = _inputs()
    change(info, trunk_run, outer)
    with pytest.raises(SystemExit, match=message):
        tuned.check_inputs(info, trunk_run, "ab" * 32, outer, IDS)


def test_metrics_are_the_first_runs_with_the_others_as_spread() -> None:
    base = json.loads((BUNDLE / "metadata.json").read_text())
    _, _, outer = _inputs()
    metrics = tuned.tuned_metrics(base, copy.deepcopy(outer))
    assert metrics["normal_vs_abnormal_auc"] == 0.78
    assert metrics["normal_vs_abnormal_auc_ci95"] == [0.78 - 0.1, 0.78 + 0.05]
    assert metrics["malignant_vs_rest_auc"] == 0.78 - 0.02
    assert metrics["lesion_hits"] == [10, 20] and metrics["lesion_hit_rate"] == 0.5
    assert metrics["repeat_aucs"] == [0.78, 0.76]
    assert metrics["lesion_hits_all_repeats"] == [22, 40]
    assert metrics["fold_aucs"] == [0.7, 0.8]
    assert metrics["recipes_chosen"] == [[{"level": "16c"}, {"level": "32"}]] * 2
    assert metrics["recipes_kind"] == ["inner", "shipped"]
    assert metrics["recipes_features"] == "lite0"
    assert metrics["frozen_trunk_same_folds"]["repeat_aucs"] == [0.77, 0.75]
    assert metrics["base_bundle"]["version"] == base["version"]
    assert "grouped by woman" in metrics["split"] and "repeat 0: inner" in metrics["split"]

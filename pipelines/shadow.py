"""The shadow bundle: a candidate model that scores the live run's views beside the live model.

It never writes or sends anything: its scores go into the run's record (`RunRecord.shadow`),
where `mammo-node shadow report` compares them with the live ones. A shadow that cannot be
loaded, or fails on a study, is recorded as a shadow error and the live run goes on untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.logs import get_logger
from node.runs import ModelRef, Scores, ShadowScores
from pipelines.results import StudyResult
from pipelines.study import LoadedView

log = get_logger("pipelines.shadow")

MAX_ERROR_CHARS = 300

# pipelines.scoring.score_views, passed in (scoring imports this module).
ScoreViews = Callable[[list[LoadedView], Any, str], tuple[StudyResult, list[np.ndarray]]]


@dataclass
class Shadow:
    """A loaded shadow model (`predictor`, a pipelines.scoring.Predictor), or why it could not
    be loaded (`error`)."""

    predictor: Any | None
    error: str | None = None

    def score(self, views: list[LoadedView], study_uid: str, score_views: ScoreViews
              ) -> ShadowScores:
        """The shadow's scores of the live run's views; any failure becomes `error`."""
        if self.predictor is None:
            return ShadowScores(error=self.error or "shadow model not loaded")
        identity = self.predictor.identity
        model = ModelRef(name=identity.name, version=identity.version)
        started = time.perf_counter()
        try:
            result, _ = score_views(views, self.predictor, study_uid)  # heatmaps dropped
            scores = Scores(
                views={s.view_key: round(s.probability, 6) for s in result.views},
                breasts={k: round(v, 6) for k, v in result.breast_scores.items()},
                exam=round(result.exam_score, 6),
                operating_point=identity.operating_point,
                suspicious=result.exam_score >= identity.operating_point,
                operating_point_name=identity.operating_point_name,
            )
        except Exception as error:  # the shadow must never fail the live run
            log.warning("shadow_scoring_failed", reason=type(error).__name__)
            return ShadowScores(model=model, error=_describe(error),
                                duration_s=round(time.perf_counter() - started, 3))
        return ShadowScores(model=model, scores=scores,
                            duration_s=round(time.perf_counter() - started, 3))


def load_shadow(bundle_dir: Path, device: str, operating_point_name: str = "balanced"
                ) -> Shadow:
    """Load the shadow bundle (its verdicts at its operating point `operating_point_name`); a
    bundle that cannot be loaded is a Shadow with its error."""
    from pipelines.model import load_bundle

    try:
        runner = load_bundle(bundle_dir, device, operating_point_name)
    except Exception as error:
        log.warning("shadow_model_not_loaded", reason=_describe(error))
        return Shadow(predictor=None, error=f"shadow model not loaded: {_describe(error)}")
    log.info("shadow_model_loaded", model=runner.identity.name, version=runner.identity.version)
    return Shadow(predictor=runner)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]

"""One learning study at the group level, in stages: settings (:mod:`.settings`) -> cohort, splits and leakage
checks, folds (:mod:`.stages`; or a search over them, :mod:`.search`) -> assembly (:mod:`.assembly`) -> the
package and results (:mod:`.record`); :mod:`.run` runs them in order and :mod:`.nested` runs a study per outer
fold so that every participant is tested once."""

from .nested import resolve_design, run_nested
from .run import run_study
from .settings import StudySettings
from .stages import serve_jobs

__all__ = ["StudySettings", "resolve_design", "run_nested", "run_study", "serve_jobs"]

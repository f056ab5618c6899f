"""What the whole-image tasks share (one class or one value per image): their cohort and site-leakage check
(:mod:`.task`), the participant level's prediction with attribution maps (:mod:`.inference`) and the external
evaluation of gathered predictions (:mod:`.external`)."""

from .task import ImageTask

__all__ = ["ImageTask"]

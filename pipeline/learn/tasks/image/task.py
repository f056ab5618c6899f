"""The whole-image tasks' common class: the family's hooks (:mod:`.base`) with the participant level's prediction
(:mod:`.inference`) and the external evaluation of gathered predictions (:mod:`.external`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import WholeImage
from .external import evaluate_image_predictions
from .inference import predict_image


class ImageTask(WholeImage):
    """A task that predicts one target per image from its model-grid array (classification, regression)."""

    def predict_participant(
        self, spec: dict[str, Any], out_dir: Path, models: Sequence[Any], *, seen: Sequence[str], device: Any
    ) -> dict[str, Any]:
        return predict_image(spec, out_dir, models, seen=seen, device=torch.device(device))

    def external_evaluation(self, run: Any) -> dict[str, Any]:
        return evaluate_image_predictions(run, self)

"""The participant level's inference node: load and check the model packages, the leakage guard, then the models'
task predicts the participant (:meth:`~pipeline.learn.task.Task.predict_participant`: a whole-image task's in
:mod:`pipeline.learn.tasks.image.inference`, segmentation's in :mod:`pipeline.learn.tasks.segmentation.inference`).

The participant workflow runs it through a thin Nipype interface (:class:`~pipeline.interfaces.inference.RunInference`),
in a fresh interpreter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InputDataError
from ..processes import module_main
from .device import resolve_device
from .ensemble import load_models, training_matches


def run_node(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Everything the inference node does, in this process: load and check the models, the leakage guard, then
    the models' task predicts the participant (:meth:`~pipeline.learn.task.Task.predict_participant`) into
    ``out_dir``."""
    torch.set_num_threads(max(1, int(spec["num_threads"])))
    device = resolve_device(spec["device"])
    models = load_models(spec["model_dirs"], device)
    if [m.record["content_sha256"] for m in models] != list(spec["model_hashes"]):
        raise InputDataError(f"The model packages changed while this run used them ({', '.join(spec['model_dirs'])}).")
    audit = json.loads(Path(spec["audit"]).read_text())
    seen = training_matches([m.record for m in models], spec["participant_id"],
                            [audit.get("intensity", {}).get("data_sha256", "")], dataset=spec.get("dataset", ""))
    if seen and not spec["allow_training_subjects"]:
        raise InputDataError("; ".join(seen) + ". Refused: use --allow-training-subjects to predict it anyway.")
    return models[0].task.predict_participant(spec, out_dir, models, seen=seen, device=device)


if __name__ == "__main__":  # the inference node's work in a fresh interpreter (:func:`pipeline.processes.run_module`)
    raise SystemExit(module_main(run_node))

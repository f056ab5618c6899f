"""Participant inference, the leakage guard and external evaluation, on the small preprocessed sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pandas as pd

from pipeline.learn.package import read_package
from tests.helpers import fresh_output, set_read_only, snapshot, validator_issues

RES = ("--model-resolution", "4", "--nprocs", "2")


def _outputs(out: Path, participant: str) -> dict[str, list[Path]]:
    folder = out / participant
    return {
        "predictions": sorted(folder.rglob("*_prediction.json")),
        "saliency": sorted(folder.rglob("*_desc-saliency_attribution.nii.gz")),
        "gradcam": sorted(folder.rglob("*_desc-gradcam_attribution.nii.gz")),
        "figures": sorted(folder.rglob("*_desc-attribution_T1w.png")),
        "meshes": sorted(folder.rglob("*_desc-brainmask_mesh.surf.gii")),
    }


def test_inference_on_new_subjects_then_external_evaluation(learning_sample, trained_package, tmp_path, run_cli):
    bids, derivatives = learning_sample
    record = read_package(trained_package)
    test_subjects = record["test_subjects"]
    out = tmp_path / "inference"
    work = derivatives / ".bidsdl_work"  # the finished preprocessing is reused, not redone
    labels = [p.removeprefix("sub-") for p in test_subjects]
    code, _, err = run_cli(bids, out, "participant", "--model", trained_package, "--participant-label", *labels,
                           "-w", work, *RES)  # fmt: skip
    assert code == 0, err
    for participant in test_subjects:
        found = _outputs(out, participant)
        n_images = len(found["meshes"])
        assert n_images and all(len(v) == n_images for v in found.values()), found
        prediction = json.loads(found["predictions"][0].read_text())
        assert prediction["models"][0]["content_sha256"] == record["content_sha256"]
        assert prediction["predicted"] in record["classes"] and not prediction["seen_in_training"]
        assert 0 <= prediction["probability"] <= 1 and prediction["threshold"] == record["threshold"]
        gradcam = nib.load(found["gradcam"][0])
        assert list(gradcam.shape) == record["input"]["shape"]
        sidecar_path = found["gradcam"][0].with_name(found["gradcam"][0].name.replace(".nii.gz", ".json"))
        sidecar = json.loads(sidecar_path.read_text())
        assert sidecar["Models"][0]["content_sha256"] == record["content_sha256"] and sidecar["SeenInTraining"] is False
        assert sidecar["Models"][0]["bidsdl_version"] and sidecar["Sources"]
        report = (out / f"{participant}.html").read_text()
        for text in ("Prediction", "Model card", "Not for clinical use", "Attribution", "Brain-mask surface"):
            assert text in report, text

    code, _, err = run_cli(bids, out, "group", "--model", trained_package)
    assert code == 0, err
    predictions = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert set(predictions["participant_id"]) == set(test_subjects)
    evaluation = json.loads((out / "external_evaluation.json").read_text())
    assert evaluation["target"] == "diagnosis" and evaluation["n_evaluated"] == len(predictions)
    assert {"roc_auc", "balanced_accuracy"} <= set(evaluation["evaluation"]["metrics"])
    assert "roc_auc" in evaluation["evaluation"]["ci"]
    assert not (out / "models").exists() and not (out / "learn").exists()  # nothing trained
    report = (out / "group.html").read_text()
    assert 'id="external"' in report and record["content_sha256"][:16] in report
    methods = (out / "methods.md").read_text()  # inference and the external evaluation; no training
    assert "## Inference" in methods and "## Evaluation on a new dataset" in methods and "## Learning" not in methods
    assert record["content_sha256"][:12] in methods
    # predictions, attribution maps and the external evaluation: still BIDS as the official validator reads it
    errors = [i for i in validator_issues(out) if i["severity"] == "error"]
    assert errors == [], errors


def test_leakage_guard_refuses_training_subjects_unless_allowed(learning_sample, trained_package, tmp_path, run_cli):
    bids, derivatives = learning_sample
    record = read_package(trained_package)
    seen = record["training_subjects"][0]["participant_id"]
    out = tmp_path / "guard"
    label = seen.removeprefix("sub-")
    code, _, err = run_cli(bids, out, "participant", "--model", trained_package, "--participant-label", label, *RES)
    assert code == 65
    assert f"{seen} is a training subject of {record['name']}" in err and "--allow-training-subjects" in err
    assert not list(out.rglob("*_prediction.json")) and not list(out.rglob("*_T1w.nii.gz"))

    code, _, err = run_cli(bids, out, "participant", "--model", trained_package, "--participant-label", label,
                           "--allow-training-subjects", "-w", derivatives / ".bidsdl_work", *RES)  # fmt: skip
    assert code == 0, err
    prediction = json.loads(_outputs(out, seen)["predictions"][0].read_text())
    assert prediction["seen_in_training"] and seen in prediction["seen_in_training_reasons"][0]
    assert "Seen in training" in (out / f"{seen}.html").read_text()
    code, _, err = run_cli(bids, out, "group", "--model", trained_package)
    assert code == 0, err
    evaluation = json.loads((out / "external_evaluation.json").read_text())
    assert evaluation["n_evaluated"] == 0 and evaluation["seen_in_training"]
    assert pd.read_csv(out / "predictions.tsv", sep="\t")["seen_in_training"].all()


def test_a_renamed_training_subject_is_caught_by_its_image(learning_sample, trained_package, tmp_path, run_cli):
    bids, _ = learning_sample
    record = read_package(trained_package)
    original = record["training_subjects"][0]
    source = bids / original["images"][0]["source"]
    renamed = tmp_path / "renamed"
    anat = renamed / "sub-new01" / "anat"
    anat.mkdir(parents=True)
    shutil.copyfile(source, anat / "sub-new01_T1w.nii.gz")
    shutil.copyfile(bids / "dataset_description.json", renamed / "dataset_description.json")
    (renamed / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-new01\tCN\n")
    before = snapshot(renamed)
    set_read_only(renamed)
    try:
        code, _, err = run_cli(renamed, tmp_path / "out", "participant", "--model", trained_package, *RES)
    finally:
        set_read_only(renamed, False)
    assert code == 65
    assert f"sub-new01's image has the voxel data of {original['participant_id']}" in err
    assert snapshot(renamed) == before


def test_model_bad_inputs_are_clear(learning_sample, trained_package, tmp_path, run_cli):
    bids, derivatives = learning_sample
    label = read_package(trained_package)["test_subjects"][0].removeprefix("sub-")
    # the model expects 4 mm; this run would prepare the default 2 mm
    code, _, err = run_cli(bids, tmp_path / "a", "participant", "--model", trained_package, "--participant-label",
                           label)  # fmt: skip
    assert code == 64 and "expects input at 4 mm" in err and "--model-resolution 4" in err
    # a missing or incomplete package
    code, _, err = run_cli(bids, tmp_path / "b", "participant", "--model", tmp_path / "nowhere", *RES)
    assert code == 65 and "does not exist" in err
    broken = tmp_path / "broken"
    shutil.copytree(trained_package, broken)
    (broken / "fold-0.safetensors").unlink()
    code, _, err = run_cli(bids, tmp_path / "c", "participant", "--model", broken, *RES)
    assert code == 65 and "incomplete: fold-0.safetensors is missing" in err
    # tampered: the threshold changed after training
    tampered = tmp_path / "tampered"
    shutil.copytree(trained_package, tampered)
    model_json = json.loads((tampered / "model.json").read_text())
    model_json["threshold"] = 0.01
    (tampered / "model.json").write_text(json.dumps(model_json))
    code, _, err = run_cli(bids, tmp_path / "d", "participant", "--model", tampered, *RES)
    assert code == 65 and "edited after training" in err
    # group --model before any participant --model run
    out = fresh_output(derivatives, tmp_path / "e")
    code, _, err = run_cli(bids, out, "group", "--model", trained_package)
    assert code == 65 and "participant --model" in err

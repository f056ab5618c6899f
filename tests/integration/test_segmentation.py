"""Segmentation end to end on the small preprocessed sample and its reference labels: training, the package,
participant-level labels in each T1w's grid checked against the generator's truth, external evaluation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.learn.package import read_package
from pipeline.learn.tasks.segmentation import dice_scores
from pipeline.sample.generate import LABEL_DESC, LABELS_DIR
from tests.helpers import fresh_output, the_package, validator_issues

# make test-infra: a segmentation study end to end (its parts: tests/unit/test_segmentation.py)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Small and fast: the 3 mm sample on a 3 mm grid, 32-voxel patches, one validation split, three epochs.
SEG = ("--task", "segmentation", "--label-desc", LABEL_DESC, "--model-resolution", "3", "--patch-size", "32",
       "--n-folds", "1", "--epochs", "3")  # fmt: skip


@pytest.fixture(scope="module")
def segmentation_run(learning_sample, tmp_path_factory):
    from pipeline.cli.run import main

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path_factory.mktemp("segmentation") / "derivatives")
    assert main([str(bids), str(out), "group", *SEG, "--labels", str(bids / LABELS_DIR)]) == 0
    return bids, derivatives, out, the_package(out)


def test_segmentation_training_leaves_a_package_and_its_evidence(segmentation_run):
    _, _, out, package = segmentation_run
    record = read_package(package)
    assert record["task"] == "segmentation" and record["label_desc"] == LABEL_DESC
    assert [e["name"] for e in record["labels"]][:2] == ["Left-Lateral-Ventricle", "Right-Lateral-Ventricle"]
    assert record["input"]["resolution_mm"] == 3 and record["patch_size"] == 32
    chosen = record["postprocessing"]["keep_largest_component"]  # decided on validation
    assert set(chosen) <= {e["name"] for e in record["labels"]}
    assert [e["index"] for e in record["labels"] if e["name"] in chosen] == record["postprocessing"]["label_indices"]
    assert not [p for p in package.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".ckpt")]
    distribution = record["distribution"]  # the U-Net's deepest maps over the training images; few validation images
    assert distribution["folds"][0]["n_features"] == 128 and np.isfinite(distribution["calibration"]["threshold"])
    calibration = distribution["calibration"]  # on validation images alone, however few (at least 2)
    assert calibration["n_validation"] >= 2 and "validation images" in calibration["calibrated_on"]
    assert {"mean", "sd"} <= set(calibration) and "Cauchy combination" in calibration["rule"]
    cases = pd.read_csv(package / "case_scores.tsv", sep="\t")
    assert set(cases["space"]) == {"template", "T1w"} and {"dice", "hd95_mm", "volume_difference_ml"} <= set(cases)
    run = out / "learn" / f"target-{LABEL_DESC}" / "arch-unet"
    results = json.loads((run / "results.json").read_text())
    native = results["test_native"]["metrics"]
    assert native["dice"] > 0.3, native  # three short epochs: far from converged, but learning
    assert native["dice_LeftLateralVentricle"] > 0.5
    assert results["test_native"]["ci"]["dice"][0] <= native["dice"] <= results["test_native"]["ci"]["dice"][1]
    history = pd.read_csv(run / "fold-0" / "history.tsv", sep="\t")
    assert {"val_dice", "val_dice_1", "val_dice_6"} <= set(history.columns) and len(history) == 3
    assert (run / "fold-0" / "worst_validation.png").stat().st_size > 1000
    assert results["worst_previews"] and (out / results["worst_previews"][0]["figure"]).exists()
    report = (out / "group.html").read_text()
    for text in ("Worst segmentations of the test set", "Metric (T1w grid)", "dice_LeftHippocampus", "Heading to"):
        assert text in report, text
    assert not [i for i in validator_issues(out) if i["severity"] == "error"]


def test_predicted_labels_land_in_each_t1w_grid_and_match_the_truth(segmentation_run, run_cli, tmp_path):
    bids, derivatives, _, package = segmentation_run
    record = read_package(package)
    test_subjects = record["test_subjects"]
    out = tmp_path / "predicted"
    code, _, err = run_cli(bids, out, "participant", "--model", package, "--nprocs", "2", "-w",
                           derivatives / ".bidsdl_work", "--participant-label",
                           *[p.removeprefix("sub-") for p in test_subjects])  # fmt: skip
    assert code == 0, err
    for participant in test_subjects:
        for t1w in sorted((bids / participant).rglob("*_T1w.nii.gz")):
            stem = t1w.name.removesuffix("_T1w.nii.gz")
            folder = out / t1w.parent.relative_to(bids)
            dseg = nib.load(folder / f"{stem}_desc-{LABEL_DESC}_dseg.nii.gz")
            raw = nib.load(t1w)
            assert dseg.shape == raw.shape and np.allclose(dseg.affine, raw.affine)
            truth = nib.load(bids / LABELS_DIR / t1w.parent.relative_to(bids) / f"{stem}_desc-{LABEL_DESC}_dseg.nii.gz")
            dice = dice_scores(np.asarray(dseg.dataobj), np.asarray(truth.dataobj), [1, 2, 5, 6])
            assert np.nanmean(dice) > 0.5, dice  # ventricles and thalami
            assert (folder / f"{stem}_desc-{LABEL_DESC}_dseg.tsv").read_text().startswith("index\tname\n1\t")
            meshes = sorted(folder.glob(f"{stem}_label-*_desc-{LABEL_DESC}_mesh.surf.gii"))
            assert len(meshes) == len(record["labels"])
            prediction = json.loads((folder / f"{stem}_prediction.json").read_text())
            volumes = prediction["volumes_ml"]
            assert 3 < volumes["Left-Lateral-Ventricle"] < 15 and prediction["structures"][0]["surface"]["area_cm2"] > 0
            assert prediction["absent_structures"] == [name for name, ml in volumes.items() if ml == 0]
            assert not list(folder.glob("*_desc-gradcam_attribution.nii.gz"))  # no classification outputs
            uncertainty = nib.load(folder / f"{stem}_label-{LABEL_DESC}_desc-uncertainty_probseg.nii.gz")
            values = np.asarray(uncertainty.dataobj)
            assert uncertainty.shape == raw.shape and values.min() >= 0 and values.max() <= 1.0001 and values.max() > 0
            assert set(prediction["uncertainty"]["structures"]) == set(volumes)
            assert prediction["distribution_check"]["checks"][0]["available"]
            assert isinstance(prediction["out_of_distribution"], bool)
        report = (out / f"{participant}.html").read_text()
        for text in ("Segmentation", "Volumes and surfaces", "uncertainty of the segmentation", "Distribution check"):
            assert text in report, text
    assert not [i for i in validator_issues(out) if i["severity"] == "error"]

    code, _, err = run_cli(bids, out, "group", "--model", package, "--labels", bids / LABELS_DIR,
                           "--label-desc", LABEL_DESC)  # fmt: skip
    assert code == 0, err
    evaluation = json.loads((out / "external_evaluation.json").read_text())
    assert evaluation["task"] == "segmentation" and evaluation["n_evaluated"] == len(
        {p for p in pd.read_csv(out / "predictions.tsv", sep="\t")["source"]}
    )
    assert evaluation["evaluation"]["metrics"]["dice"] > 0.3
    scores = pd.read_csv(out / "external_case_scores.tsv", sep="\t")
    assert set(scores["structure"]) == {e["name"] for e in record["labels"]}
    assert "External evaluation" in (out / "group.html").read_text()
    assert evaluation["by_distribution"]["measure"] == "Dice (mean over structures)"


def test_segmentation_bad_input_gets_one_clear_message(segmentation_run, trained_package, run_cli, tmp_path):
    bids, derivatives, _, package = segmentation_run
    code, _, err = run_cli(bids, tmp_path / "a", "group", "--task", "segmentation", "--label-desc", LABEL_DESC)
    assert code == 64 and "--task segmentation needs --labels DIR" in err
    code, _, err = run_cli(bids, tmp_path / "b", "group", "--task", "segmentation", "--labels", bids / LABELS_DIR,
                           "--label-desc", LABEL_DESC, "--architecture", "conv5fc3")  # fmt: skip
    assert code == 64 and "does not fit --task segmentation" in err
    out = fresh_output(derivatives, tmp_path / "c")
    code, _, err = run_cli(bids, out, "group", *SEG, "--labels", bids)  # the raw dataset, not a derivatives one
    assert code == 65 and "DatasetType 'raw'" in err
    code, _, err = run_cli(bids, out, "group", *SEG, "--labels", bids / LABELS_DIR, "--selection-metric", "roc_auc")
    assert code == 64 and "--selection-metric roc_auc needs classification; use loss, dice" in err
    code, _, err = run_cli(bids, tmp_path / "d", "participant", "--model", package, "--model", trained_package)
    assert code == 64 and "cannot form an ensemble: task is 'segmentation'" in err

"""Learning from more than one contrast and learning lesions: channels found through the participant level's
records, stacked caches, lesion-by-lesion patches, the size-weighted loss, lesion-wise scores and the smallest kept
lesion."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline import derivatives
from pipeline.learn.channels import channel_files, channel_sources
from pipeline.learn.cohort import cache_cohort, usable_images
from pipeline.learn.tasks.segmentation.data import SegmentationData
from pipeline.learn.tasks.segmentation.loss import segmentation_loss
from pipeline.learn.tasks.segmentation.metrics import lesion_scores, structure_scores, summarise_cases
from pipeline.learn.tasks.segmentation.postprocess import choose_min_lesion_size, remove_small_lesions

T1W = "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
FLAIR = "sub-01/ses-01/anat/sub-01_ses-01_acq-2d_FLAIR.nii.gz"


def _record(out: Path, source: str, reference: str, verdict: str = "pass") -> None:
    derivatives.write_json(derivatives.named_path(out, source, "iqm"),
                           {"source": source, "reference": reference, "qc": {"verdict": verdict}})  # fmt: skip


def _model_grid(out: Path, source: str, value: float) -> None:
    path = derivatives.named_path(out, source, "preproc_model", model_resolution=4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.full((4, 5, 6), value, np.float32), np.eye(4) * 4).to_filename(path)


def test_channels_are_the_images_aligned_to_the_t1w(tmp_path):
    out = tmp_path / "out"
    _record(out, FLAIR, T1W)
    _record(out, "sub-01/ses-01/anat/sub-01_ses-01_acq-3d_FLAIR.nii.gz", T1W)  # two: the first by name
    _record(out, "sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz", "sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.nii.gz")
    found = channel_sources(out, T1W, ["T1w", "FLAIR"])
    assert found.sources == (T1W, FLAIR) and found.reason == ""
    assert channel_sources(out, T1W, ["FLAIR", "T1w"]).sources == (FLAIR, T1W)
    missing = channel_sources(out, T1W, ["T1w", "T2w"])  # the T2w belongs to another T1w
    assert missing.sources is None and missing.left_out(["T1w", "T2w"], False) == (
        "no T2w aligned to it (a T2w of its session, processed at the participant level); --inputs T1w T2w")
    _record(out, FLAIR, T1W, verdict="fail")
    failed = channel_sources(out, T1W, ["T1w", "FLAIR"])
    assert failed.left_out(["T1w", "FLAIR"], False) == (
        f"its {FLAIR} failed quality control (--include-failed-qc keeps it)")
    assert failed.left_out(["T1w", "FLAIR"], True) is None


def test_a_model_s_channels_are_handed_in_its_order_or_refused_by_kind():
    record = {"name": "m", "input": {"channels": ["T1w", "FLAIR"]}}
    assert channel_files(record, "t1.nii", ["flair.nii"]) == ["t1.nii", "flair.nii"]
    try:
        channel_files(record, "t1.nii", [])
    except ValueError as exc:
        assert "no FLAIR was aligned to this T1w" in str(exc)
    else:
        raise AssertionError("a missing channel must be refused")


def test_the_cohort_stacks_channels_and_leaves_out_a_t1w_without_one(tmp_path):
    out = tmp_path / "out"
    second = "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz"
    for source, value in ((T1W, 1.0), (FLAIR, 2.0), (second, 3.0)):
        _model_grid(out, source, value)
    _record(out, FLAIR, T1W)
    manifest = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "source": [T1W, second], "age": [70.0, 71.0]})
    table, excluded = usable_images(manifest, output_dir=out, target="age", resolution_mm=4.0, qc=None,
                                    exclude_qc_outliers=False, inputs=("T1w", "FLAIR"))  # fmt: skip
    assert table["source"].tolist() == [T1W]
    assert excluded == [{"source": second, "reason": "no FLAIR aligned to it (a FLAIR of its session, processed at "
                         "the participant level); --inputs T1w FLAIR"}]  # fmt: skip
    cached = cache_cohort(table, tmp_path / "cache")
    array = np.load(cached["array"].iloc[0])
    assert array.shape == (2, 4, 5, 6) and array[0].max() == 1.0 and array[1].max() == 2.0
    again = cache_cohort(table, tmp_path / "cache")
    assert again["array"].iloc[0] == cached["array"].iloc[0]
    assert again["input_sha256"].iloc[0] == cached["input_sha256"].iloc[0]
    # one channel: the cache as before (the T1w's own array and hash)
    single, _ = usable_images(manifest, output_dir=out, target="age", resolution_mm=4.0, qc=None,
                              exclude_qc_outliers=False)  # fmt: skip
    assert len(single) == 2 and "channel_inputs" not in single


def _lesion_case(tmp_path: Path) -> SegmentationData:
    image = np.random.default_rng(0).normal(size=(2, 40, 40, 40)).astype(np.float32)
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:20, 5:20, 5:20] = 1  # one large lesion (3,375 voxels)
    label[30, 30, 30] = 1  # one single-voxel lesion
    np.save(tmp_path / "x.npy", image)
    np.save(tmp_path / "y.npy", label)
    return SegmentationData([tmp_path / "x.npy"], [tmp_path / "y.npy"], patch_size=8, n_classes=2)


def test_lesion_patches_come_lesion_by_lesion_with_every_channel(tmp_path):
    data = _lesion_case(tmp_path)
    x, y = data.batch(np.zeros(400, int), seed=1)
    assert x.shape == (400, 2, 8, 8, 8) and y.shape == (400, 1, 8, 8, 8)
    centres = y[:, 0, 4, 4, 4].numpy()
    on_small = int(((y[:, 0].sum(dim=(1, 2, 3)) == 1) & (torch.from_numpy(centres) == 1)).sum())
    # half the patches are centred on a lesion, each lesion equally likely: ~100 on the one-voxel lesion
    assert 60 < on_small < 140, on_small


def test_missing_a_small_lesion_costs_more_than_missing_as_many_voxels_of_a_large_one():
    y = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    y[0, 0, 1:9, 1:9, 1:9] = 1  # 512 voxels
    y[0, 0, 12:14, 12:14, 12:14] = 1  # 8 voxels
    perfect = torch.where(y == 1, 5.0, -5.0)
    logits = torch.cat([-perfect, perfect], dim=1)
    missing_small, missing_part_of_large = logits.clone(), logits.clone()
    missing_small[0, :, 12:14, 12:14, 12:14] = torch.tensor([5.0, -5.0])[:, None, None, None]
    missing_part_of_large[0, :, 1:3, 1:3, 1:3] = torch.tensor([5.0, -5.0])[:, None, None, None]
    loss = segmentation_loss(2)
    assert loss(missing_small, y) > loss(missing_part_of_large, y) * 1.5


def test_the_smallest_kept_lesion_is_chosen_on_validation():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    for i in range(0, 20, 4):  # scattered single-voxel false positives
        pred[15, i, 15] = 1
    assert choose_min_lesion_size([(pred, ref)]) == 2
    assert lesion_scores(remove_small_lesions(pred, 2) == 1, ref == 1, 0.001)["lesion_f1"] == 1.0
    assert choose_min_lesion_size([(ref, ref)]) == 0  # nothing to remove: the least removed


def test_lesion_wise_scores_are_summarised_with_confidence_intervals():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[6:8, 6:8, 6:8] = 1
    rows = []
    for subject, pred in (("sub-01", ref), ("sub-02", np.where(np.arange(10)[:, None, None] < 5, ref, 0))):
        for score in structure_scores(pred, ref, {1: "lesion"}, (1.0, 1.0, 1.0)):
            rows.append({"participant_id": subject, "source": f"{subject}_T1w.nii.gz", **score})
    summary = summarise_cases(pd.DataFrame(rows), seed=1, ci=True)
    assert summary["metrics"]["lesion_recall"] == 0.75 and summary["metrics"]["lesion_f1"] == (1 + 2 / 3) / 2
    assert "lesion_f1" in summary["ci"] and json.dumps(summary, default=float)


def test_a_case_empty_in_reference_and_prediction_scores_as_the_challenges_score_it():
    empty = np.zeros((10, 10, 10), np.uint8)
    (both,) = structure_scores(empty, empty, {1: "lesion"}, (1.0, 1.0, 1.0))
    assert (both["dice"], both["hd95_mm"], both["avd_percent"]) == (1.0, 0.0, 0.0)
    assert (both["lesion_recall"], both["lesion_precision"], both["lesion_f1"]) == (1.0, 1.0, 1.0)
    found = empty.copy()
    found[2:4, 2:4, 2:4] = 1
    (false_alarm,) = structure_scores(found, empty, {1: "lesion"}, (1.0, 1.0, 1.0))
    assert false_alarm["dice"] == 0 and false_alarm["lesion_f1"] == 0 and false_alarm["lesion_precision"] == 0
    assert np.isnan(false_alarm["lesion_recall"]) and np.isnan(false_alarm["avd_percent"])
    (missed,) = structure_scores(empty, found, {1: "lesion"}, (1.0, 1.0, 1.0))
    assert missed["lesion_recall"] == 0 and np.isnan(missed["lesion_precision"]) and np.isnan(missed["hd95_mm"])

"""Segmentation's pure parts: reference labels, case-wise scores, grids, patches, the task table."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import InputDataError, UsageError
from pipeline.learn import labels as lb
from pipeline.learn.registry import TASK_NAMES, get_task
from pipeline.learn.tasks.segmentation import (
    SegmentationData,
    labels_on_grid,
    probabilities_to_native,
    structure_scores,
)
from tests.helpers import write_nifti

NAMES = {1: "Left-Thing", 2: "Right-Thing"}


def _labels_dataset(root, *, kind="derivative"):
    lb.write_labels_dataset(root, "test", NAMES, generated_by="test", version="0")
    if kind != "derivative":
        (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "DatasetType": kind}))
    return root


def test_every_task_is_one_module_with_its_metric_directions():
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.name == name and "loss" in task.direction
    with pytest.raises(UsageError, match="Unknown task"):
        get_task("detection")


def test_labels_dataset_must_be_a_derivatives_dataset(tmp_path):
    with pytest.raises(UsageError, match="not a folder"):
        lb.check_labels_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"dataset_description\.json is missing"):
        lb.check_labels_dataset(tmp_path / "empty")
    raw = _labels_dataset(tmp_path / "raw", kind="raw")
    with pytest.raises(InputDataError, match="DatasetType 'raw'"):
        lb.check_labels_dataset(raw)
    lb.check_labels_dataset(_labels_dataset(tmp_path / "ok"))


def test_lookup_table_beside_the_image_wins_over_the_root(tmp_path):
    root = _labels_dataset(tmp_path / "labels")
    assert lb.find_table(root, "test").names == NAMES
    image = lb.label_path(root, "sub-01/anat/sub-01_T1w.nii.gz", "test")
    image.parent.mkdir(parents=True)
    image.with_name(image.name.replace(".nii.gz", ".tsv")).write_text("index\tname\n0\tbg\n7\tSeven\n")
    assert lb.find_table(root, "test", near=image).names == {7: "Seven"}
    with pytest.raises(InputDataError, match="No lookup table for --label-desc other"):
        lb.find_table(root, "other")
    (root / "desc-bad_dseg.tsv").write_text("id\tlabel\n1\ta\n")
    with pytest.raises(InputDataError, match="needs 'index' and 'name'"):
        lb.find_table(root, "bad")


def test_label_images_are_checked_against_their_t1w(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1w = write_nifti(tmp_path / "t1w.nii.gz", np.zeros((8, 8, 8), np.float32), affine)
    table = lb.LabelTable(NAMES, None)
    good = np.zeros((8, 8, 8), np.uint8)
    good[2:4, 2:4, 2:4] = 1
    assert lb.load_label(write_nifti(tmp_path / "a_dseg.nii.gz", good, affine), t1w, table).sum() == 8
    moved = affine.copy()
    moved[0, 3] = 5.0
    with pytest.raises(InputDataError, match=r"not on the grid of their T1w.*\(8, 8, 8\) vs \(8, 8, 8\)"):
        lb.load_label(write_nifti(tmp_path / "b_dseg.nii.gz", good, moved), t1w, table)
    with pytest.raises(InputDataError, match=r"shape \(8, 8, 6\) vs \(8, 8, 8\)"):
        lb.load_label(write_nifti(tmp_path / "c_dseg.nii.gz", good[:, :, :6], affine), t1w, table)
    unknown = good.copy()
    unknown[5, 5, 5] = 9
    with pytest.raises(InputDataError, match=r"indices \[9\] that the lookup table"):
        lb.load_label(write_nifti(tmp_path / "d_dseg.nii.gz", unknown, affine), t1w, table)
    with pytest.raises(InputDataError, match="are empty"):
        lb.load_label(write_nifti(tmp_path / "e_dseg.nii.gz", np.zeros((8, 8, 8), np.uint8), affine), t1w, table)
    mask = good * 5  # a binary mask: any non-zero value is the one foreground class
    assert set(np.unique(lb.load_label(write_nifti(tmp_path / "f_mask.nii.gz", mask, affine), t1w, table))) == {0, 1}


def test_structure_scores_on_known_shapes():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.roll(ref, 1, axis=0)  # one voxel off
    (score,) = structure_scores(pred, ref, {1: "cube"}, (2.0, 2.0, 2.0))
    assert score["dice"] == pytest.approx(0.9)
    assert score["hd95_mm"] == pytest.approx(2.0)  # one 2 mm voxel
    assert score["volume_difference_ml"] == 0 and score["volume_ref_ml"] == pytest.approx(8.0)
    (missing,) = structure_scores(np.zeros_like(ref), ref, {1: "cube"}, (1, 1, 1))
    assert missing["dice"] == 0 and np.isnan(missing["hd95_mm"])


def test_labels_go_to_the_grid_and_probabilities_come_back():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[8:20, 10:22, 6:18] = 1
    labels[20:26, 10:22, 6:18] = 2
    native = np.diag([1.0, 1.0, 1.0, 1.0])
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    transform = sitk.AffineTransform(3)  # identity: template = T1w world
    on_grid = labels_on_grid(labels, native, transform, grid, (15, 15, 15))
    assert set(np.unique(on_grid)) == {0, 1, 2}
    onehot = np.stack([on_grid == k for k in range(3)]).astype(np.float32)
    back = probabilities_to_native(onehot, grid, transform, native, labels.shape)
    assert back.shape == labels.shape
    assert (back == labels).mean() > 0.97


def test_patches_are_drawn_from_the_seed_and_oversample_structures(tmp_path):
    image = np.random.default_rng(0).normal(size=(1, 24, 24, 24)).astype(np.float32)
    label = np.zeros((24, 24, 24), np.uint8)
    label[20:23, 20:23, 20:23] = 1  # small, in a corner
    np.save(tmp_path / "x.npy", image)
    np.save(tmp_path / "y.npy", label)
    data = SegmentationData([tmp_path / "x.npy"], [tmp_path / "y.npy"], patch_size=8, n_classes=2)
    order = data.epoch_order(epoch=0, seed=1, weights=None)
    assert len(order) >= 250 and (order == data.epoch_order(epoch=0, seed=1, weights=None)).all()
    x, y = data.batch(np.zeros(300, int), seed=3)
    x2, y2 = data.batch(np.zeros(300, int), seed=3)
    assert x.shape == (300, 1, 8, 8, 8) and y.shape == (300, 1, 8, 8, 8)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    with_structure = (y.reshape(300, -1).amax(1) > 0).float().mean()
    assert with_structure > 0.25  # a random place would hit the 27-voxel corner in ~5% of patches
    _, ya = data.batch(np.zeros(4, int), augment=("affine", "intensity", "noise"), seed=3)
    assert set(np.unique(ya.numpy())) <= {0, 1}  # labels stay labels


def test_the_sample_labels_its_structures_exactly(tmp_path):
    from pipeline.sample.generate import LABEL_DESC, LABELS_DIR, SampleOptions, write_sample_dataset

    write_sample_dataset(tmp_path / "bids", SampleOptions(n_subjects=1, seed=3, two_session_fraction=0, voxel_scale=3))
    (t1w,) = sorted((tmp_path / "bids").glob("sub-*/ses-*/anat/*_T1w.nii.gz"))
    source = t1w.relative_to(tmp_path / "bids").as_posix()
    labels_dir = tmp_path / "bids" / LABELS_DIR
    lb.check_labels_dataset(labels_dir)
    table = lb.find_table(labels_dir, LABEL_DESC)
    path = lb.find_label(labels_dir, source, LABEL_DESC)
    assert path is not None
    data = lb.load_label(path, t1w, table)
    truth = json.loads((tmp_path / "bids" / "sourcedata" / "truth" / f"{t1w.name.split('.')[0]}.json").read_text())
    voxel_ml = abs(np.linalg.det(nib.load(t1w).affine[:3, :3])) / 1000
    for index, name in table.names.items():
        assert (data == index).sum() * voxel_ml == pytest.approx(truth["StructureVolumesMl"][name], abs=1e-3)
        assert truth["StructureVolumesMl"][name] > 0.5, name


def _tiny_cases(folder, n):
    rng = np.random.default_rng(0)
    arrays, labels = [], []
    for i in range(n):
        label = np.zeros((16, 16, 16), np.uint8)
        c = rng.integers(5, 11, 3)
        label[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 1
        label[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] + 2 : c[2] + 4] = 2
        image = (label.astype(np.float32) + rng.normal(0, 0.3, label.shape)).astype(np.float32)[None]
        np.save(folder / f"x{i}.npy", image)
        np.save(folder / f"y{i}.npy", label)
        arrays.append(folder / f"x{i}.npy")
        labels.append(folder / f"y{i}.npy")
    return SegmentationData(arrays, labels, patch_size=8, n_classes=3)


def test_segmentation_training_with_ema_resumes_to_the_same_weights(tmp_path):
    import torch

    from pipeline.learn.models import ModelConfig, build_model
    from pipeline.learn.train import FitHooks, TrainSettings, fit

    train, val = _tiny_cases(tmp_path, 4), _tiny_cases(tmp_path, 2)
    settings = TrainSettings(n_outputs=3, epochs=2, batch_size=2, lr=3e-3, seed=1, ema=True)

    def model():
        torch.manual_seed(0)
        return build_model(ModelConfig("unet", 3, (16, 16, 16), {"channels": (4, 8), "strides": (2,)}))

    full = model()
    common = {"task": get_task("segmentation"), "device": torch.device("cpu")}
    result = fit(full, train, val, settings, run_dir=tmp_path / "full", **common)
    assert "val_dice_2" in result.history[-1] and (tmp_path / "full" / "worst_validation.png").exists()

    class Killed(Exception):
        pass

    def kill(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(model(), train, val, settings, run_dir=tmp_path / "resumed", hooks=FitHooks(on_epoch_end=kill), **common)
    resumed = model()
    fit(resumed, train, val, settings, run_dir=tmp_path / "resumed", resume=True, **common)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for name in ("best-loss.safetensors", "best-dice.safetensors"):  # the averaged weights, kept
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_largest_component_kept_only_where_validation_says_so():
    from pipeline.learn.tasks.segmentation import SegmentationOutputs, choose_largest_components

    reference = np.zeros((20, 20, 20), np.uint8)
    reference[2:8, 2:8, 2:8] = 1  # one blob: an anatomical structure
    reference[12:15, 2:5, 2:5] = 2  # two blobs: lesions
    reference[12:15, 12:15, 12:15] = 2
    predicted = reference.copy()
    predicted[17:19, 17:19, 1:3] = 1  # a stray island of structure 1
    assert choose_largest_components([(predicted, reference)], [1, 2]) == [1]
    outputs = SegmentationOutputs([np.eye(3, dtype=np.float16)[predicted].transpose(3, 0, 1, 2)], keep_largest=(1,))
    labels = outputs.labels(0)
    assert (labels == 1).sum() == 216 and (labels == 2).sum() == 54  # the island is gone, both lesions stay

"""The pieces of the sample generator: geometry, deformation, bias and noise."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.sample import anatomy
from pipeline.sample.generate import ORIENTATIONS, SampleOptions, plan_dataset


@pytest.mark.parametrize("angles", [(0, 0, 0), (10, -5, 15), (-15, 15, -15)])
def test_rotation_is_orthonormal(angles):
    r = anatomy.rotation_matrix(angles)
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1)


@pytest.mark.parametrize("code", ORIENTATIONS)
def test_grid_affine_has_the_requested_orientation_and_centre(code):
    shape = (20, 30, 40)
    affine = anatomy.grid_affine(orientation=code, voxel_size=(1, 1.5, 2), shape=shape, centre_mm=(5, -3, 7))
    assert "".join(nib.aff2axcodes(affine)) == code
    centre_vox = (np.array(shape) - 1) / 2
    assert np.allclose(affine[:3, :3] @ centre_vox + affine[:3, 3], [5, -3, 7])
    assert np.allclose(nib.affines.voxel_sizes(affine), (1, 1.5, 2))


def test_radial_deform_expands_and_shrinks_a_dark_blob():
    affine = np.eye(4)
    grid = np.indices((41, 41, 41)) - 20
    image = np.where((grid**2).sum(axis=0) < 6**2, 0.0, 1.0).astype(np.float32)
    dark = (image < 0.5).sum()
    assert np.array_equal(anatomy.radial_deform(image, affine, (20, 20, 20), 6, 0.0), image)
    grown = anatomy.radial_deform(image, affine, (20, 20, 20), 6, 0.3)
    shrunk = anatomy.radial_deform(image, affine, (20, 20, 20), 6, -0.3)
    assert (grown < 0.5).sum() > 1.3 * dark
    assert (shrunk < 0.5).sum() < 0.8 * dark


def test_bias_field_is_smooth_and_near_one():
    field = anatomy.bias_field((30, 30, 30), [0.05] * 9)
    assert field.dtype == np.float32 and 0.5 < field.min() < field.max() < 2
    assert np.abs(np.diff(field, axis=0)).max() < 0.05
    assert np.array_equal(anatomy.bias_field((4, 4, 4), [0] * 9), np.ones((4, 4, 4), np.float32))


def test_rician_noise_is_positive_with_the_right_spread():
    rng = np.random.default_rng(0)
    noisy = anatomy.rician(np.full((100, 100, 10), 100, np.float32), 5.0, rng)
    assert noisy.min() >= 0 and abs(noisy.mean() - 100) < 1 and abs(noisy.std() - 5) < 0.5
    background = anatomy.rician(np.zeros((100, 100, 10), np.float32), 5.0, rng)
    assert abs(background.mean() - 5 * np.sqrt(np.pi / 2)) < 0.2  # Rayleigh mean


def test_plan_is_deterministic_and_labels_drive_effects():
    options = SampleOptions(n_subjects=40, seed=3)
    participants, images = plan_dataset(options)
    assert (participants, images) == plan_dataset(options)
    assert plan_dataset(SampleOptions(n_subjects=40, seed=4))[0] != participants
    assert len(participants) == 40 and 40 < len(images) < 80
    ad = [i.ventricles for i in images if i.diagnosis == "AD"]
    cn = [i.ventricles for i in images if i.diagnosis == "CN"]
    assert np.mean(ad) > np.mean(cn) + 0.1
    assert {i.session for i in images} == {"01", "02"}
    assert any(not i.compressed for i in images)


def test_site_confound_option():
    participants, _ = plan_dataset(SampleOptions(n_subjects=60, seed=1, confound_site=True))
    rate = {s: np.mean([p["diagnosis"] == "AD" for p in participants if p["site"] == s]) for s in ("siteA", "siteC")}
    assert rate["siteC"] - rate["siteA"] > 0.5


def test_an_individual_shape_is_smooth_invertible_and_reproducible():
    shape = anatomy.individual_shape(5, anatomy.SHAPE_RMS_MM)
    assert shape is not None and anatomy.individual_shape(5, 0.0) is None
    assert np.allclose(np.sqrt((shape.field**2).mean(axis=(1, 2, 3))), anatomy.SHAPE_RMS_MM, rtol=1e-4)
    gradients = [np.gradient(component, anatomy.SHAPE_GRID_MM) for component in shape.field]
    jacobian = np.stack([np.stack(g, axis=-1) for g in gradients], axis=-2) + np.eye(3)
    det = np.linalg.det(jacobian)
    assert det.min() > 0.4 and det.max() < 1.8  # no fold: one individual is the template, smoothly displaced
    again = anatomy.individual_shape.__wrapped__(5, anatomy.SHAPE_RMS_MM)
    assert np.array_equal(again.field, shape.field)
    # sampled through a coarse interpolation: within an eighth of a voxel of the exact displacement
    grid = anatomy.grid_affine(orientation="LPS", voxel_size=(2, 2, 2), shape=(40, 50, 30), centre_mm=(3, -10, 5))
    coords = anatomy.shape_coordinates(np.eye(4), grid, (40, 50, 30), np.eye(4), shape)
    idx = np.indices((40, 50, 30), dtype=float)[:, ::7, ::9, ::5]
    points = np.tensordot(grid[:3, :3], idx, axes=1) + grid[:3, 3][:, None, None, None]
    assert np.abs(coords[:, ::7, ::9, ::5] - (points + shape(points))).max() < 0.25  # mm, at 2 mm voxels


def test_individuals_differ_in_head_size_by_sex_and_in_their_own_structures():
    participants, images = plan_dataset(SampleOptions(n_subjects=60, seed=2))
    by_subject = {f"sub-{i.subject}": i for i in images}
    scale = {s: [by_subject[p["participant_id"]].head_scale for p in participants if p["sex"] == s] for s in "FM"}
    assert np.mean(scale["M"]) > np.mean(scale["F"]) + 0.02 and np.std(scale["F"]) > 0.015
    assert 0.85 < np.mean(scale["F"]) < 0.93 < np.mean(scale["M"]) + 0.03  # smaller than the template, as people are
    for image in images:  # one person: the same head in every session
        first = by_subject[f"sub-{image.subject}"]
        assert (image.head_scale, image.shape_seed) == (first.head_scale, first.shape_seed) and image.shape_seed
    cn = [i.ventricles for i in images if i.diagnosis == "CN" and i.session == "01"]
    assert np.std(cn) > 0.06  # people differ apart from the disease
    # --individual-variation 0: every head is the template's, the rest of the draws as they were
    same, flat = plan_dataset(SampleOptions(n_subjects=60, seed=2, individual_variation=0.0))
    assert same == participants and {(i.head_scale, i.shape_seed) for i in flat} == {(1.0, 0)}
    assert [i.seed for i in flat] == [i.seed for i in images]

"""The nonlinear registration's pure parts: the Jacobian, the composite transform, the warp's quality, tissue
segmentation with priors, modulation and regional volumes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.ops import iqm, morphometry, resample, warp
from pipeline.ops.images import array_to_sitk


def _field(shape, spacing, direction, function):
    """A displacement field whose value at each physical point x is function(x)."""
    grid = sitk.Image(list(shape), sitk.sitkVectorFloat64, 3)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction)
    grid.SetOrigin((-10.0, 5.0, -3.0))
    points = np.array([grid.TransformIndexToPhysicalPoint((i, j, k)) for k in range(shape[2])
                       for j in range(shape[1]) for i in range(shape[0])])  # fmt: skip
    values = np.apply_along_axis(function, 1, points).reshape(shape[2], shape[1], shape[0], 3)
    field = sitk.GetImageFromArray(values, isVector=True)
    field.CopyInformation(grid)
    return field


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (0, 1, 0, 1, 0, 0, 0, 0, -1)])  # fmt: skip
def test_jacobian_of_a_known_field_on_any_grid(direction):
    # u(x) = (0.1 x + 0.05 y, -0.2 y, 0.3 z): J = I + grad u, det = 1.1 * 0.8 * 1.3
    field = _field((7, 6, 5), (2.0, 1.5, 3.0), direction,
                   lambda x: np.array([0.1 * x[0] + 0.05 * x[1], -0.2 * x[1], 0.3 * x[2]]))
    det = warp.jacobian_determinant(field)
    assert det.shape == (7, 6, 5)
    assert np.allclose(det, 1.1 * 0.8 * 1.3, atol=1e-5)
    scaled = warp.jacobian_determinant(field, np.diag([1.2, 1.0, 0.5]))
    assert np.allclose(scaled, 1.1 * 0.8 * 1.3 * 0.6, atol=1e-5)


def test_folds_are_counted_and_the_quality_reports_them():
    # u_x = -2 x in one half: the mapping x -> -x there (det < 0)
    field = _field((8, 8, 8), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                   lambda x: np.array([-2.0 * x[0] if x[2] > 0 else 0.0, 0.0, 0.0]))
    quality = warp.warp_quality(field, np.ones((8, 8, 8), bool), dice_affine=0.95, dice_warp=0.9)
    assert 0.3 < quality["warp_folded_share"] < 0.8
    assert quality["warp_dice_gain"] == pytest.approx(-0.05)
    verdict = iqm.assess({**quality, "registration_ncc": 0.6, "mask_dice": 0.97, "wm_dice": 0.5})
    checks = {c["metric"]: c["result"] for c in verdict["checks"]}
    assert verdict["verdict"] == "fail"
    assert checks["warp_folded_share"] == "fail" and checks["warp_dice_gain"] == "fail"
    assert "warp_folded" in verdict["flags"]


def test_a_good_warp_passes_and_an_affine_run_is_not_measured():
    good = {"warp_folded_share": 0.0, "warp_logjac_p999": 0.6, "warp_dice_gain": 0.004,
            "registration_ncc": 0.6, "mask_dice": 0.97, "wm_dice": 0.5}  # fmt: skip
    assert iqm.assess(good)["verdict"] == "pass"
    affine_only = iqm.assess({"registration_ncc": 0.6, "mask_dice": 0.97, "wm_dice": 0.5})
    assert {c["result"] for c in affine_only["checks"] if c["metric"].startswith("warp_")} == {"not measured"}


def test_composite_applies_the_field_then_the_affine():
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((2.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    field = _field((12, 12, 12), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), lambda x: np.array([1.0, 0.0, 0.0]))
    composite = warp.compose(affine, field)
    # inside the field's grid (origin (-10, 5, -3)): x -> x + (1, 0, 0) -> A(.)
    assert np.allclose(composite.TransformPoint((-5.0, 10.0, 2.0)), (-8.0, 10.0, 2.0))
    inverse = warp.inverse_composite(affine, field)
    assert np.allclose(inverse.TransformPoint((-8.0, 10.0, 2.0)), (-5.0, 10.0, 2.0), atol=0.05)


def test_segmentation_with_priors_beats_intensity_alone_where_intensities_overlap():
    rng = np.random.default_rng(1)
    truth = np.repeat([0, 1, 2], 3000).reshape(90, 10, 10)
    # GM and WM overlap heavily in intensity: the priors decide
    image = np.choose(truth, [30.0, 80.0, 95.0]) + rng.normal(0, 10, truth.shape)
    priors = {name: (truth == k) * 0.8 + 0.1 for k, name in enumerate(("csf", "gm", "wm"))}
    flat = {name: np.full(truth.shape, 1 / 3) for name in ("csf", "gm", "wm")}
    brain = np.ones(truth.shape, bool)
    accuracy = {}
    for kind, prior in (("priors", priors), ("flat", flat)):
        maps, _ = morphometry.segment_with_priors(image, brain, prior)
        hard = np.argmax([maps[c] for c in ("csf", "gm", "wm")], axis=0)
        accuracy[kind] = float((hard == truth).mean())
        total = sum(maps.values())
        assert np.allclose(total[image > 0], 1.0, atol=1e-4) and not total[image <= 0].any()  # no signal: no tissue
    assert accuracy["priors"] > 0.9 and accuracy["priors"] > accuracy["flat"] + 0.1
    volumes = morphometry.tissue_volumes_ml(maps, 1.0)
    assert volumes["TIV"] == pytest.approx(float((image > 0).sum()) / 1000, rel=1e-4)


def test_a_tissue_the_template_lacks_is_still_found():
    rng = np.random.default_rng(2)
    truth = np.repeat([0, 1, 2], 3000).reshape(90, 10, 10)
    image = np.choose(truth, [30.0, 80.0, 130.0]) + rng.normal(0, 5, truth.shape)
    priors = {"csf": np.zeros(truth.shape), "gm": (truth != 2) * 1.0, "wm": (truth == 2) * 1.0}  # no CSF prior
    maps, _ = morphometry.segment_with_priors(image, np.ones(truth.shape, bool), priors)
    assert float((maps["csf"][truth == 0] > 0.5).mean()) > 0.9


def test_modulation_keeps_a_tissue_volume_through_a_scaling():
    # the T1w is the template scaled by 1.25 along x: a map moved into template space and multiplied by det J
    # sums to the T1w's volume
    subject_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    blob = np.zeros((60, 40, 40), np.float32)
    blob[15:45, 10:30, 10:30] = 1.0
    scale = sitk.AffineTransform(3)
    scale.SetMatrix((1.25, 0, 0, 0, 1, 0, 0, 0, 1))  # template points -> T1w points
    template_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    moved = resample.resample(array_to_sitk(blob, subject_affine), scale, template_affine, (60, 40, 40))
    det = float(np.linalg.det(warp.affine_matrix(scale)))
    assert det == pytest.approx(1.25)
    assert float((moved * det).sum()) == pytest.approx(float(blob.sum()), rel=0.02)


def test_regional_volumes_integrate_the_jacobian_and_name_what_is_missing():
    atlas = np.zeros((10, 10, 10), int)
    atlas[:5] = 17
    atlas[5:] = 53
    jac = np.full(atlas.shape, 1.5)
    fov = np.ones(atlas.shape, bool)
    fov[9] = False  # 20% of region 53 outside the field of view
    rows = morphometry.regional_volumes(atlas, {17: "Left-Hippocampus", 53: "Right-Hippocampus", 4: "Ventricle"}, jac,
                                        fov, 8.0)  # fmt: skip
    by_name = {r["region"]: r for r in rows}
    assert by_name["Left-Hippocampus"]["volume_ml"] == pytest.approx(500 * 1.5 * 8 / 1000)
    assert np.isnan(by_name["Right-Hippocampus"]["volume_ml"])
    assert "80% of the region inside the field of view" in by_name["Right-Hippocampus"]["reason"]
    assert np.isnan(by_name["Ventricle"]["volume_ml"]) and by_name["Ventricle"]["reason"] == "not in the atlas grid"


def test_the_shipped_atlas_has_the_classic_structures():
    atlas = morphometry.default_atlas()
    names = set(atlas.labels.values())
    assert {"Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle", "Right-Lateral-Ventricle"} <= names
    labels, affine = atlas.load()
    assert labels.ndim == 3 and abs(np.linalg.det(affine[:3, :3])) == pytest.approx(1.0)
    assert set(np.unique(labels)) - {0} <= set(atlas.labels)


def test_template_priors_fill_the_ventricles_with_csf():
    brain = np.zeros((9, 9, 9), bool)
    brain[1:8, 1:8, 1:8] = True
    brain[4, 4, 4] = False  # a ventricle: dark on the template, outside its T1 > 0.2 mask
    gm = np.where(brain, 0.5, 0.0).astype(np.float32)
    wm = np.where(brain, 0.4, 0.0).astype(np.float32)
    priors = morphometry.template_priors(gm, wm, brain)
    assert priors["csf"][4, 4, 4] == pytest.approx(1.0)
    assert priors["csf"][0, 0, 0] == 0.0


def test_tabular_features_use_the_training_rows_only():
    from pipeline.learn import baseline

    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3))
    x[2, 1] = np.nan
    train = np.arange(6)
    z = baseline.tabular_features(x)(train)
    changed = x.copy()
    changed[6:] = 1e6  # the other rows: nothing of them enters the training rows' features
    assert np.allclose(baseline.tabular_features(changed)(train)[train], z[train])
    assert np.isfinite(z).all() and abs(float((z[train] ** 2).sum(axis=1).mean()) - 1) < 1e-9


def test_volume_features_read_each_table_and_the_covariates(tmp_path):
    import pandas as pd

    from pipeline import derivatives
    from pipeline.learn.volumes import volume_features

    sources = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"]
    for i, source in enumerate(sources):
        path = derivatives.named_path(tmp_path, source, "volumes")
        path.parent.mkdir(parents=True)
        path.write_text("index\tregion\tvolume_ml\n17\tLeft-Hippocampus\t" + ("n/a" if i else "4.0") +
                        "\nn/a\tTIV\t1500\n")  # fmt: skip
    images = pd.DataFrame({"source": sources, "age": [70.0, 71.0], "sex": ["F", "M"], "diagnosis": ["AD", "CN"]})
    x, names, described = volume_features(tmp_path, images, target="diagnosis")
    assert names == ["Left-Hippocampus", "TIV", "age", "sex=M"]
    assert x is not None and np.isnan(x[1, 0]) and x[1, 3] == 1.0 and "age and sex" in described
    x, missing, described = volume_features(tmp_path, images.assign(source=[sources[0], "sub-03/anat/sub-03_T1w.nii"]),
                                            target="diagnosis")  # fmt: skip
    assert x is None and missing == ["sub-03/anat/sub-03_T1w.nii"] and "--registration syn" in described


def test_outer_folds_partition_the_subjects_and_refuse_too_many():
    import pandas as pd

    from pipeline.errors import InputDataError
    from pipeline.learn.registry import get_task
    from pipeline.learn.splits import SplitSettings, make_splits

    task = get_task("classification")
    subjects = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(15)], "y": [0] * 9 + [1] * 6})
    tests = []
    for k in range(3):
        settings = SplitSettings(0.2, 2, 0.2, 1, ("target",), outer_folds=3, outer_test=k)
        table = make_splits(subjects, settings, task=task)
        test = set(table.query("split == 'test'")["participant_id"])
        assert not set(table.query("split != 'test'")["participant_id"]) & test
        assert sorted(subjects.loc[subjects["participant_id"].isin(test), "y"].tolist()) == [0, 0, 0, 1, 1]
        tests.append(test)
    assert set().union(*tests) == set(subjects["participant_id"]) and sum(len(t) for t in tests) == 15
    with pytest.raises(InputDataError, match="--outer-folds 7: the rarest class has 6"):
        make_splits(subjects, SplitSettings(0.2, 2, 0.2, 1, ("target",), outer_folds=7, outer_test=0), task=task)


def test_study_folders_name_their_inputs():
    from pathlib import Path

    from pipeline.derivatives import study_dir

    assert study_dir(Path("o"), "diagnosis", "conv5fc3").name == "arch-conv5fc3"
    assert study_dir(Path("o"), "lesion", "unet", ("T1w", "FLAIR")).name == "arch-unet_inputs-T1w+FLAIR"


def test_the_morphometric_ceiling_is_what_true_volumes_reach():
    from pipeline.sample.generate import ImageSpec, morphometric_ceiling

    rng = np.random.default_rng(4)
    participants, images, truths = [], [], []
    for i in range(40):
        ad = i % 2 == 0
        participants.append({"participant_id": f"sub-{i:02d}", "diagnosis": "AD" if ad else "CN"})
        images.append(ImageSpec(subject=f"{i:02d}", session="01", age=70.0, diagnosis="AD" if ad else "CN",
                                site="a", seed=i, ventricles=0.0, hippocampi=0.0))  # fmt: skip
        ventricles = rng.normal(30 + (8 if ad else 0), 4)
        truths.append({"StructureVolumesMl": {"Left-Lateral-Ventricle": ventricles / 2,
                                              "Right-Lateral-Ventricle": ventricles / 2,
                                              "Left-Hippocampus": 3.0, "Right-Hippocampus": 3.0},
                       "BrainVolumeMl": 1100 + rng.normal(0, 50)})  # fmt: skip
    ceiling = morphometric_ceiling(participants, images, truths, seed=0)
    assert 0.8 < ceiling["auc"] <= 1.0 and ceiling["folds"] == 5
    assert set(ceiling["volumes_ml"]["sub-00"]) == {"ventricles", "hippocampi", "brain"}


def test_a_model_of_morphometry_maps_needs_the_warp_at_the_participant_level():
    from pathlib import Path

    from pipeline.errors import UsageError
    from pipeline.learn.ensemble import check_registration

    record = {"input": {"channels": ["GM", "logjacobian"]}}
    check_registration([record], "syn", [Path("m")])
    with pytest.raises(UsageError, match="GM, logjacobian"):
        check_registration([record], "affine", [Path("m")])
    check_registration([{"input": {"channels": ["T1w"]}}], "affine", [Path("m")])

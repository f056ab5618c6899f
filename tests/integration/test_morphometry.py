"""The participant level's default path: the affine, then ANTs SyN, tissue maps, modulated maps, the log-Jacobian and
regional volumes (at a 4 mm warp grid and 3 mm voxels: the behaviour, not the benchmark's figures); the refusals of
morphometry inputs without them; nested cross-validation. Learning from the maps: test_morphometry_learning.py."""

from __future__ import annotations

import csv
import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import derivatives
from pipeline.ops import resample, warp
from pipeline.ops.images import nib_to_sitk
from pipeline.ops.template import load_template
from tests.helpers import FAST, WARP, fresh_output, preprocessed_sample, validator_issues

# make test-infra: the nonlinear registration of a cohort end to end (its parts: tests/unit/test_morphometry.py)
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def warped_run(tmp_path_factory):
    """One participant (two sessions) through the default path: SyN at a 4 mm warp grid, 3 mm voxels."""
    from pipeline.sample.generate import SampleOptions

    options = SampleOptions(n_subjects=1, seed=11, two_session_fraction=1, voxel_scale=3, n_jobs=2)
    with preprocessed_sample(tmp_path_factory.mktemp("morphometry"), options, *WARP) as run:
        yield run


def _json(path):
    return json.loads(path.read_text())


def _sources(bids):
    return sorted(p.relative_to(bids).as_posix() for p in bids.glob("sub-*/**/anat/*_T1w.nii.gz"))


def test_every_t1w_has_its_warp_tissue_maps_and_volumes(warped_run):
    bids, out, code = warped_run
    assert code == 0
    for source in _sources(bids):
        path = lambda name, source=source, **kw: derivatives.named_path(out, source, name, **kw)  # noqa: E731
        for name in ("xfm_warp", "xfm_warp_inverse", "warped_template", "volumes", "morphometry", "fig_warp",
                     "fig_jacobian"):  # fmt: skip
            assert path(name).exists(), path(name)
        assert path("logjacobian", model_resolution=4).exists()
        for tissue in ("GM", "WM", "CSF"):
            assert path("tissue_probseg", structure=tissue).exists()
            assert path("tissue_modulated", model_resolution=4, structure=tissue).exists()
        # the affine's transform and its sidecar are still there, not overwritten by the composite's
        assert "final_metric" in _json(derivatives.sidecar_of(path("xfm")))["Registration"]


def test_the_warp_is_good_and_its_quality_is_in_the_verdict(warped_run):
    bids, out, _ = warped_run
    for source in _sources(bids):
        record = _json(derivatives.named_path(out, source, "iqm"))
        metrics = record["metrics"]
        assert metrics["warp_folded_share"] < 0.001
        assert metrics["warp_dice"] >= metrics["warp_dice_affine"] - 0.01
        results = {c["metric"]: c["result"] for c in record["qc"]["checks"]}
        assert results["warp_folded_share"] == results["warp_dice_gain"] == "pass"


def test_the_composite_transform_reproduces_the_warped_image(warped_run):
    bids, out, _ = warped_run
    source = _sources(bids)[0]
    composite = sitk.ReadTransform(str(derivatives.named_path(out, source, "xfm_warp")))
    corrected = nib.load(derivatives.named_path(out, source, "preproc"))
    template = load_template(1)
    moved = resample.resample(nib_to_sitk(corrected), composite, template.affine, template.t1.shape)
    warped = np.asanyarray(nib.load(derivatives.named_path(out, source, "warped_template")).dataobj)
    inside = template.brain_mask
    assert np.corrcoef(moved[inside], warped[inside])[0, 1] > 0.99
    # the inverse brings template points back: a round trip lands within a voxel of the field's grid
    inverse = sitk.ReadTransform(str(derivatives.named_path(out, source, "xfm_warp_inverse")))
    point = (-10.0, 20.0, 15.0)
    assert np.linalg.norm(np.subtract(inverse.TransformPoint(composite.TransformPoint(point)), point)) < 2.0


def test_modulation_keeps_the_tissue_volume_and_volumes_are_plausible(warped_run):
    bids, out, _ = warped_run
    for source in _sources(bids):
        probseg = nib.load(derivatives.named_path(out, source, "tissue_probseg", structure="GM"))
        modulated = nib.load(derivatives.named_path(out, source, "tissue_modulated", model_resolution=4,
                                                    structure="GM"))  # fmt: skip
        native_ml = float(np.asanyarray(probseg.dataobj).sum()) * np.prod(probseg.header.get_zooms()[:3]) / 1000
        template_ml = float(np.asanyarray(modulated.dataobj).sum()) * np.prod(modulated.header.get_zooms()[:3]) / 1000
        assert template_ml == pytest.approx(native_ml, rel=0.15)
        with open(derivatives.named_path(out, source, "volumes"), newline="") as handle:
            rows = {row["region"]: row for row in csv.DictReader(handle, delimiter="\t")}
        for region in ("Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle"):
            assert 0.5 < float(rows[region]["volume_ml"]) < 60, rows[region]
        tissues = sum(float(rows[t]["volume_ml"]) for t in ("GM", "WM", "CSF"))
        assert float(rows["TIV"]["volume_ml"]) == pytest.approx(tissues, rel=1e-3)
        assert 900 < float(rows["TIV"]["volume_ml"]) < 2500
        logjac = nib.load(derivatives.named_path(out, source, "logjacobian", model_resolution=4))
        assert np.isfinite(np.asanyarray(logjac.dataobj)).all()


def test_the_report_shows_the_warp_and_the_validator_accepts_everything(warped_run):
    _, out, _ = warped_run
    html = (out / "sub-01.html").read_text()
    assert "Nonlinear registration (ANTs SyN)" in html and "log-Jacobian" in html
    issues = validator_issues(out)
    assert [i for i in issues if i["severity"] == "error"] == []
    # every tissue map names the image whose grid it lies on (BIDS recommends SpatialReference)
    assert [i["location"] for i in issues if i.get("subCode") == "SpatialReference"] == []
    ignored = (out / ".bidsignore").read_text()
    assert "*_desc-volumes_T1w.tsv" in ignored and "*_desc-nonlinear_xfm.h5" in ignored


def test_syn_gives_the_same_field_twice_and_recovers_a_known_deformation():
    template = load_template(4)
    fixed = resample.array_to_sitk(template.t1, template.affine)
    # the "subject": the template moved by a smooth known displacement (a bulge of up to 4 mm)
    grid = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
    grid.CopyInformation(fixed)
    shape = template.t1.shape
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    bump = 4.0 * np.exp(-(i**2 + j**2 + k**2) / 0.2)
    u = np.stack([bump, 0.5 * bump, np.zeros(shape)], axis=-1).transpose(2, 1, 0, 3)
    truth = sitk.GetImageFromArray(u, isVector=True)
    truth.CopyInformation(fixed)
    subject = sitk.Resample(fixed, fixed, sitk.DisplacementFieldTransform(warp.inverse_field(truth)), sitk.sitkLinear,
                            0.0)  # fmt: skip
    identity = sitk.AffineTransform(3)
    fields = [warp.syn_register(subject, fixed, identity, seed=3, threads=2)[1] for _ in range(2)]
    assert np.array_equal(sitk.GetArrayFromImage(fields[0]), sitk.GetArrayFromImage(fields[1]))
    found = sitk.GetArrayFromImage(fields[0])
    inside = (sitk.GetArrayFromImage(fixed) > 0.2) & (np.linalg.norm(u, axis=-1) > 2.0)
    error_before = np.linalg.norm(u[inside], axis=-1).mean()
    error_after = np.linalg.norm((found - u)[inside], axis=-1).mean()
    assert error_after < 0.5 * error_before


def test_morphometry_inputs_without_the_warp_are_refused_naming_the_fix(learning_sample, tmp_path, run_cli):
    bids, derivatives_dir = learning_sample
    out = fresh_output(derivatives_dir, tmp_path / "derivatives")  # made with --registration affine
    code, _, err = run_cli(bids, out, "group", *FAST, "--inputs", "GM")
    assert code == 65
    assert "label-GM_desc-modulated_probseg.nii.gz" in err and "--registration affine" in err
    assert "participant" in err


def test_nested_cross_validation_tests_every_participant_once(learning_sample, tmp_path, run_cli):
    bids, derivatives_dir = learning_sample
    out = fresh_output(derivatives_dir, tmp_path / "derivatives")
    # two outer folds as two array tasks, then the assembly
    nested = (*FAST, "--n-folds", "1", "--val-size", "0.5", "--outer-folds", "2")  # one inner split: quick
    for k in (0, 1):
        code, _, err = run_cli(bids, out, "group", *nested, "--outer-fold", str(k))
        assert code == 0, err
        assert (out / "learn" / "target-diagnosis" / f"outer-{k}" / "splits.tsv").exists()
    assert not (out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "results.json").exists()
    assert not (out / "models").exists()  # an outer fold's package stays in its folder
    code, _, err = run_cli(bids, out, "group", *nested)
    assert code == 0, err
    assert "Outer fold 0 of 2: finished with these settings, reused" in err
    results = _json(out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "results.json")
    nested = results["nested"]
    import pandas as pd

    predictions = pd.read_csv(out / nested["predictions"], sep="\t")
    subjects = sorted(pd.read_csv(out / "manifest.tsv", sep="\t")["participant_id"].unique())
    assert sorted(predictions["participant_id"].unique()) == subjects  # every participant predicted
    assert predictions.groupby("participant_id")["outer_fold"].nunique().max() == 1  # ... once
    tests = [set(pd.read_csv(out / "learn" / "target-diagnosis" / f"outer-{k}" / "splits.tsv", sep="\t")
                 .query("split == 'test'")["participant_id"]) for k in (0, 1)]  # fmt: skip
    assert not tests[0] & tests[1] and tests[0] | tests[1] == set(subjects)
    for k in (0, 1):  # no outer fold learned from its own test participants
        splits = pd.read_csv(out / "learn" / "target-diagnosis" / f"outer-{k}" / "splits.tsv", sep="\t")
        assert not set(splits.query("split != 'test'")["participant_id"]) & tests[k]
    assert results["test"]["n_subjects"] == len(subjects) == nested["n_tested"]
    assert len(nested["per_outer_fold"]) == 2 and "roc_auc" in nested["spread"]
    assert results["baseline"]["comparison"]["roc_auc"]["ci"] and "volumes_baseline" not in results  # affine
    # the learning curve: the linear model on subsets of each outer fold's training participants, pooled
    points = results["baseline"]["learning_curve"]
    assert points[-1]["fraction"] == 1.0 and all(a["n_train"] < b["n_train"] for a, b in itertools.pairwise(points))
    assert points[-1]["value"] == pytest.approx(results["baseline"]["test"]["metrics"]["roc_auc"])
    # the model for later use learned from everyone (inner folds only); its card gives the nested evaluation
    (package,) = (out / "models").iterdir()
    assert results["package"] == f"models/{package.name}"
    record = _json(package / "model.json")
    assert not record["test_subjects"] and len(record["training_subjects"]) == len(subjects)
    assert record["metrics"]["test"]["metrics"]["roc_auc"] == results["test"]["metrics"]["roc_auc"]
    assert "nested cross-validation" in record["metrics"]["test"]["source"]
    assert (out / "learn" / "target-diagnosis" / "outer-all" / "splits.tsv").exists()
    html = (out / "group.html").read_text()
    assert "Nested cross-validation: every participant tested once" in html
    assert "Would more participants help?" in html and package.name in html


def test_more_outer_folds_than_the_smallest_class_are_refused(learning_sample, tmp_path, run_cli):
    bids, derivatives_dir = learning_sample
    out = fresh_output(derivatives_dir, tmp_path / "derivatives")
    code, _, err = run_cli(bids, out, "group", *FAST, "--outer-folds", "5")
    assert code == 65 and "--outer-folds 5: the rarest class has 4 subject(s)" in err
    code, _, err = run_cli(bids, out, "group", *FAST, "--outer-fold", "1")
    assert code == 64 and "use it with --outer-folds N" in err


def test_the_default_design_is_chosen_from_the_cohort_before_any_training(learning_sample):
    """Below 300 participants the group level nests by default; how many outer folds the rarest class allows."""
    from pipeline.cli.parser import parse_args
    from pipeline.group import _gather, study_settings
    from pipeline.learn.study.nested import resolve_design

    bids, out = learning_sample
    config = parse_args([str(bids), str(out), "group", "--target", "diagnosis", "--n-folds", "2",
                         "--model-resolution", "4"])  # fmt: skip
    assert config.outer_folds is None
    table, _, _ = _gather(config, with_t1w=None, folders=None)
    settings = resolve_design(table, settings=study_settings(config), requested=None, output_dir=out, qc=None)
    assert settings.split.outer_folds == 4 and settings.learning_settings["outer_folds"] == 4  # 4 AD, 4 CN
    assert settings.design["chosen_by"] == "default" and "8 participants, fewer than 300" in settings.design["reason"]
    asked = resolve_design(table, settings=study_settings(config), requested=0, output_dir=out, qc=None)
    assert asked.split.outer_folds == 0 and asked.design["chosen_by"] == "--outer-folds"


def test_the_default_inputs_are_the_t1w_where_outputs_lack_morphometry(learning_sample):
    """Without --inputs a whole-image study learns from GM and the log-Jacobian when every processed T1w has them;
    on outputs made with --registration affine, from the T1w, saying why (and the design keeps saying it)."""
    from pipeline.cli.parser import parse_args
    from pipeline.group import _gather, study_settings, with_inputs
    from pipeline.learn.study.nested import resolve_design

    bids, out = learning_sample
    config = parse_args([str(bids), str(out), "group", "--target", "diagnosis", "--model-resolution", "4"])
    assert config.inputs is None
    table, _, _ = _gather(config, with_t1w=None, folders=None)
    settings = with_inputs(study_settings(config), table, requested=None, output_dir=out)
    assert settings.inputs == ("T1w",) and settings.learning_settings["inputs"] == ["T1w"]
    assert "--registration affine" in settings.design["inputs_reason"]
    assert "processed T1w have no morphometry maps" in settings.design["inputs_reason"]
    designed = resolve_design(table, settings=settings, requested=0, output_dir=out, qc=None)
    assert designed.design["inputs_chosen_by"] == "default" and designed.design["outer_folds"] == 0
    asked = with_inputs(study_settings(config), table, requested=("T1w", "FLAIR"), output_dir=out)
    assert asked.inputs == ("T1w", "FLAIR") and asked.design["inputs_chosen_by"] == "--inputs"

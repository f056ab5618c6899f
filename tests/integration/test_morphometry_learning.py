"""Learning from morphometry (slow: a cohort of 8 through the nonlinear registration; make test-infra): a study of
modulated grey matter and the log-Jacobian with the voxel and regional-volumes baselines, then a participant-level
prediction with that model making the same maps, and its refusal without them."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FAST, WARP, preprocessed_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def morphometry_sample(tmp_path_factory):
    """The learning sample's 8 participants (4 AD, 4 CN) through the default path (SyN at a 4 mm warp grid)."""
    from pipeline.sample.generate import SampleOptions

    options = SampleOptions(n_subjects=8, seed=6, two_session_fraction=0.25, voxel_scale=3, n_jobs=2)
    with preprocessed_sample(tmp_path_factory.mktemp("morphometry_learning"), options, *WARP) as (bids, out, code):
        assert code == 0
        yield bids, out


def test_a_study_of_morphometry_maps_with_both_baselines(morphometry_sample, run_cli, tmp_path):
    bids, out = morphometry_sample
    code, _, err = run_cli(bids, out, "group", *FAST)  # no --inputs: the morphometry maps, which every T1w has
    assert code == 0, err
    run = out / "learn" / "target-diagnosis" / "arch-conv5fc3_inputs-GM+logjacobian"
    results = _json(run / "results.json")
    assert results["inputs"] == ["GM", "logjacobian"]
    assert results["design"]["inputs_chosen_by"] == "default" and "--inputs T1w" in results["design"]["inputs_reason"]
    assert "Inputs (bidsdl&#39;s default for these outputs): GM and logjacobian" in (out / "group.html").read_text()
    record = _json(the_package_of(out) / "model.json")
    assert record["input"]["channels"] == ["GM", "logjacobian"]
    assert results["baseline"]["features"].startswith("the network's model-grid voxels")
    volumes = results["volumes_baseline"]
    assert "regional volumes" in volumes["features"] and "age" in volumes["features"]
    assert volumes["verdict"]["result"] in ("better", "not_better", "worse", "undecided")
    assert (run / "volumes_baseline_predictions.tsv").exists()
    assert "Against regional volumes" in (out / "group.html").read_text()
    # a participant-level prediction with that model makes the same inputs (the morphometry of the new run)
    package = the_package_of(out)
    new_out = tmp_path / "predicted"
    label = record["test_subjects"][0].removeprefix("sub-")
    code, _, err = run_cli(bids, new_out, "participant", "--model", package, "--participant-label", label,
                           "--allow-training-subjects", "--model-resolution", "4", *WARP,
                           "-w", out / ".bidsdl_work")  # fmt: skip
    assert code == 0, err
    (prediction,) = sorted(new_out.glob(f"sub-{label}/**/*_prediction.json"))
    assert _json(prediction)["predicted"] in record["classes"]
    # ... and refuses to run without the nonlinear registration that makes them
    code, _, err = run_cli(bids, tmp_path / "affine", "participant", "--model", package, "--participant-label", label,
                           "--allow-training-subjects", "--model-resolution", "4", "--registration", "affine")
    assert code == 64 and "--registration affine" in err and "GM, logjacobian" in err


def the_package_of(out):
    (package,) = sorted((out / "models").iterdir())
    return package



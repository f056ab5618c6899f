"""Hard and bad heads through the participant level: each processes, is flagged, or fails its participant
with a message that names the image, what looked wrong and what to try; nothing garbage is marked done.

One dataset, one participant run (and a group run) for the module: ten small heads at 3-4 mm. Minutes of
real runs: ``make test-infra`` runs them (marker ``robustness``), beside the container, SLURM and fault tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from tests.helpers import AFFINE, NO_CHROMIUM, browser_dom, make_bids, set_read_only, snapshot, write_nifti

pytestmark = [pytest.mark.integration, pytest.mark.robustness]


def _head(seed: int, *, voxel_scale: float = 3.0, large_fov: bool = False):
    """A sample head (RAS), its true brain mask and its truth."""
    from pipeline.sample import anatomy
    from pipeline.sample.generate import ImageSpec, SampleOptions, make_image

    spec = ImageSpec(subject="x", session="01", age=70.0, diagnosis="CN", site="siteA", seed=seed,
                     ventricles=0.0, hippocampi=0.0)  # fmt: skip
    options = SampleOptions(voxel_scale=voxel_scale, large_fov_fraction=1.0 if large_fov else 0.0)
    img, mask, _, _ = make_image(spec, anatomy.default_head(), options)
    ras = nib.as_closest_canonical(img)
    brain = np.asanyarray(nib.as_closest_canonical(mask).dataobj) > 0
    return np.asanyarray(ras.dataobj).astype(np.float32), brain, ras.affine


def _write(root: Path, label: str, data: np.ndarray, affine: np.ndarray) -> None:
    path = root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
    if path.exists():
        path.unlink()
    write_nifti(path, np.asarray(data, np.float32), affine)


def _hard_heads(root: Path) -> None:
    data, _, affine = _head(22)  # very low contrast
    rng = np.random.default_rng(0)
    _write(root, "lowcontrast", data.mean() + 0.1 * (data - data.mean()) + rng.normal(0, 0.1 * data.std(), data.shape),
           affine)  # fmt: skip
    data, _, affine = _head(23)  # not a T1: contrast inverted (bright fluid, dark white matter)
    _write(root, "inverted", np.where(data > 0.1 * data.max(), data.max() - data, data), affine)
    tiny = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # a small field of view
    img = nib.load(tiny)
    _write(root, "tiny", np.asanyarray(img.dataobj), img.affine)
    data, brain, affine = _head(24)  # skull-stripped already
    _write(root, "stripped", data * ndimage.binary_dilation(brain, iterations=1), affine)
    data, brain, affine = _head(25)  # cut 35 mm below the top of the brain
    top = np.flatnonzero(brain.any(axis=(0, 1))).max()
    _write(root, "cut", data[:, :, : top - round(35 / abs(affine[2, 2]))], affine)
    shape = (60, 60, 70)  # not a brain: a cylinder phantom
    grid = np.indices(shape).astype(np.float32)
    radius = np.hypot(grid[0] - 29.5, grid[1] - 29.5)
    phantom = ndimage.gaussian_filter(np.where(radius < 22, 600.0, 0) + np.where(radius < 10, 400.0, 0), 1.5)
    _write(root, "notbrain", np.abs(phantom + rng.normal(0, 20, shape)), np.diag([3.0, 3.0, 3.0, 1.0]))
    data, _, affine = _head(26, voxel_scale=4.0)  # a 4 mm scan
    _write(root, "lowres", data, affine)
    data, brain, affine = _head(27, large_fov=True)  # neck and shoulders 4x brighter than the brain
    data[:, :, : np.flatnonzero(brain.any(axis=(0, 1))).min()] *= 4.0
    _write(root, "brightneck", data, affine)
    data, _, affine = _head(28)  # wrong header: stored upside down
    _write(root, "flipped", data[:, :, ::-1], affine)
    data, _, affine = _head(29)  # wrong header: left-right and front-back axes swapped
    _write(root, "swapped", data.transpose(1, 0, 2), affine)


LABELS = ("lowcontrast", "inverted", "tiny", "stripped", "cut", "notbrain", "lowres", "brightneck", "flipped",
          "swapped")  # fmt: skip
FAILING = ("inverted", "tiny", "notbrain", "flipped", "swapped")


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    from pipeline.cli.run import main

    root = tmp_path_factory.mktemp("hard")
    bids = make_bids(root / "bids", {label: [f"anat/sub-{label}_T1w.nii.gz"] for label in LABELS})
    _hard_heads(bids)
    before = snapshot(bids)
    set_read_only(bids)
    out = root / "out"
    codes = {"participant": main([str(bids), str(out), "participant", "--nprocs", "2", *AFFINE])}
    codes["group"] = main([str(bids), str(out), "group"])
    yield bids, out, codes
    set_read_only(bids, False)
    assert snapshot(bids) == before


def _record(out: Path, label: str, desc: str = "iqm") -> dict:
    return json.loads((out / f"sub-{label}" / "anat" / f"sub-{label}_desc-{desc}_T1w.json").read_text())


def _status(out: Path, label: str) -> dict:
    return json.loads((out / f"sub-{label}" / "log" / f"sub-{label}_status.json").read_text())


def test_the_participant_level_fails_only_what_is_garbage(hard_run):
    _, out, codes = hard_run
    assert codes == {"participant": 1, "group": 0}
    states = {label: _status(out, label)["state"] for label in LABELS}
    assert {label for label, state in states.items() if state == "failed"} == set(FAILING)


@pytest.mark.parametrize("label", ["stripped", "lowres", "brightneck"])
def test_hard_but_sound_heads_pass(hard_run, label):
    """Skull-stripped, 4 mm, and a neck four times brighter than the brain: brain extraction and registration
    still succeed. The skull-stripped head's tissue mixture splits grey from white matter wrongly: that is
    flagged and shown (its contrast metrics rest on those classes), not hidden."""
    _, out, _ = hard_run
    record = _record(out, label)
    allowed = {"implausible_tissue_classes"} if label == "stripped" else set()
    assert record["qc"]["verdict"] != "fail" and set(record["qc"]["flags"]) <= allowed, record["qc"]["flags"]
    assert record["metrics"]["mask_dice"] > 0.94 and record["metrics"]["registration_ncc"] > 0.6
    assert _status(out, label)["state"] == "done"


def test_borderline_heads_are_flagged_and_kept(hard_run):
    _, out, _ = hard_run
    assert "low_contrast" in _record(out, "lowcontrast")["qc"]["flags"]
    cut = _record(out, "cut")
    assert "brain_at_fov_edge" in cut["qc"]["flags"] and cut["metrics"]["brain_fov_edge_mm2"] > 1000
    for label in ("lowcontrast", "cut"):
        assert _record(out, label)["qc"]["verdict"] == "flag" and _status(out, label)["state"] == "done"


@pytest.mark.parametrize(
    ("label", "words"),
    [
        ("flipped", ("other registration signals", "header")),  # a wrong header: an outline still matches
        ("swapped", ("white matter", "header")),
        ("inverted", ("does not line up",)),  # not a T1: negative correlation with the template
        ("notbrain", ("may not be a T1w of a head",)),
        ("tiny", ("too small", "voxel size")),
    ],
)
def test_garbage_fails_its_participant_with_a_clear_message(hard_run, label, words):
    _, out, _ = hard_run
    status = _status(out, label)
    assert status["state"] == "failed" and status["images"][0]["state"] == "failed"
    message = status["errors"][0]
    assert message.startswith(f"sub-{label}/anat/sub-{label}_T1w.nii.gz: ")
    assert "failed quality control" in message and "--include-failed-qc" in message
    for word in words:
        assert word in message, message
    record = _record(out, label)
    assert record["qc"]["verdict"] == "fail"
    # the evidence is kept and shown: outputs, both masks, the report with the checks
    anat = out / f"sub-{label}" / "anat"
    assert (anat / f"sub-{label}_desc-template_mask.nii.gz").exists()
    report = (out / f"sub-{label}.html").read_text()
    assert 'class="state-failed"' in report and "Quality verdict" in report and "two independent brain masks" in report


def test_a_wrong_header_is_caught_by_the_registration_signals_together(hard_run):
    """Stored upside down, a brain's outline still overlaps the template's (mask Dice ~0.9): each signal alone
    is near its limit, all three beyond their flag limits fail it."""
    from pipeline.ops.iqm import REGISTRATION_SIGNALS

    _, out, _ = hard_run
    record = _record(out, "flipped")
    assert record["metrics"]["mask_dice"] > 0.85 and record["metrics"]["wm_dice"] < 0.33
    results = {c["metric"]: c["result"] for c in record["qc"]["checks"]}
    assert all(results[m] == "fail" for m in REGISTRATION_SIGNALS) and record["qc"]["verdict"] == "fail"


def test_the_group_level_lists_the_failures_and_learns_without_them(hard_run):
    _, out, _ = hard_run
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    failed = sorted(qc.loc[qc["qc_verdict"] == "fail", "participant_id"])
    assert failed == sorted(f"sub-{label}" for label in FAILING)
    html = (out / "group.html").read_text()
    assert "Failed quality control" in html and "Every image passed quality control" in html
    for label in FAILING:
        assert f"sub-{label}/anat/sub-{label}_T1w.nii.gz" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_a_failed_report_opens_in_a_browser(hard_run, tmp_path):
    _, out, _ = hard_run
    assert "Quality verdict" in browser_dom(out / "sub-flipped.html", tmp_path)

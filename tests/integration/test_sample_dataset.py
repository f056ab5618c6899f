"""The sample dataset: valid BIDS, byte-identical for a seed, with a true transform that holds."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.bids.layout import validate_dataset
from pipeline.cli.sample import main as sample_main
from pipeline.sample.anatomy import load_template
from pipeline.sample.generate import SampleOptions, write_sample_dataset
from tests.helpers import snapshot

pytestmark = pytest.mark.integration


def test_sample_dataset_is_valid_bids_with_labels_and_truth(sample_bids):
    t1w = sorted(sample_bids.rglob("*_T1w.nii*"))
    assert validate_dataset(sample_bids, t1w_paths=t1w) == []
    participants = (sample_bids / "participants.tsv").read_text().splitlines()
    assert participants[0].split("\t") == ["participant_id", "age", "sex", "site", "diagnosis"]
    assert len(participants) == 1 + 4  # three participants and the planted duplicate
    for path in t1w:
        stem = path.name.split(".")[0]
        sidecar = json.loads(path.with_name(f"{stem}.json").read_text())
        assert sidecar["Manufacturer"] and sidecar["MagneticFieldStrength"] in (1.5, 3)
    planted = json.loads((sample_bids / "sourcedata" / "generation.json").read_text())["planted"]
    original, copy = planted["duplicate_subject"]["original"], planted["duplicate_subject"]["copy"]
    a = next(sample_bids.glob(f"{original}/ses-01/anat/*_T1w.nii*")).read_bytes()
    b = next(sample_bids.glob(f"{copy}/ses-01/anat/*_T1w.nii*")).read_bytes()
    assert a == b


def test_true_transform_maps_the_head_onto_the_template(sample_bids):
    """The brain's centre of mass in the image, mapped by the recorded truth, lands on the template's."""
    template = load_template()
    idx = np.argwhere(template.brain_mask)
    template_centre = template.affine[:3, :3] @ idx.mean(axis=0) + template.affine[:3, 3]
    for path in sorted(sample_bids.glob("sub-*/ses-*/anat/*_T1w.nii*"))[:3]:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        truth = json.loads((sample_bids / "sourcedata" / "truth" / f"{path.name.split('.')[0]}.json").read_text())
        # brain-like voxels: bright, and away from the scalp (the template's brain is the bright core)
        to_template = np.asarray(truth["T1wToTemplate"]) @ img.affine
        ijk = np.argwhere(data > np.percentile(data, 60))
        xyz = ijk @ to_template[:3, :3].T + to_template[:3, 3]
        inside = np.linalg.norm(xyz - template_centre, axis=1) < 60
        centre = xyz[inside].mean(axis=0)
        assert np.linalg.norm(centre - template_centre) < 6, path.name


@pytest.mark.slow  # the sample written twice
def test_same_seed_gives_identical_files_whatever_the_parallelism(tmp_path):
    options = SampleOptions(n_subjects=2, seed=11, two_session_fraction=0.0, corrupt_subject=True)
    write_sample_dataset(tmp_path / "a", options)
    write_sample_dataset(tmp_path / "b", SampleOptions(**{**options.__dict__, "n_jobs": 2}))
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    corrupt = json.loads((tmp_path / "a" / "sourcedata" / "generation.json").read_text())["planted"]["corrupt_file"]
    with pytest.raises(Exception):  # noqa: B017 - any read error proves the corruption
        np.asanyarray(nib.load(tmp_path / "a" / corrupt).dataobj)


def test_sample_cli(tmp_path, capsys):
    assert sample_main([str(tmp_path / "s"), "--subjects", "1", "--two-session-fraction", "0", "--nprocs", "1"]) == 0
    assert "1 participants, 1 images" in capsys.readouterr().out
    assert sample_main([str(tmp_path / "s"), "--subjects", "1"]) == 73  # not empty: refuse to overwrite
    assert sample_main([str(tmp_path / "t"), "--subjects", "0"]) == 64
    assert sample_main([str(tmp_path / "t"), "--bogus"]) == 64

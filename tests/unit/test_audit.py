"""The audit of one image, on small synthetic files with known answers."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from pipeline.bids.audit import audit_t1w, intensity_summary, orientation_info, sha256_array
from pipeline.sample.anatomy import grid_affine, rotation_matrix
from tests.helpers import write_nifti


@pytest.fixture
def bids_dir(tmp_path):
    return tmp_path


def audit(path, bids_dir, **kwargs):
    return audit_t1w(path, bids_dir=bids_dir, **kwargs)


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "PIR", "LIA", "ASL"])
def test_orientation_codes(code):
    affine = grid_affine(orientation=code, voxel_size=(1, 1, 1), shape=(10, 10, 10), centre_mm=(0, 0, 0))
    info = orientation_info(affine)
    assert info["orientation"] == code
    assert not info["oblique"]


def test_oblique_flag_and_angle():
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix([0, 0, 10])
    info = orientation_info(affine)
    assert info["oblique"] and info["obliquity_deg"] == pytest.approx(10, abs=0.01)


def test_intensity_summary_known_answers():
    data = np.arange(101, dtype=np.float32)
    summary = intensity_summary(data)
    assert summary["min"] == 0 and summary["max"] == 100
    assert summary["percentiles"]["p50"] == 50 and summary["percentiles"]["p1"] == pytest.approx(1)
    assert summary["nan_count"] == 0 and summary["zero_fraction"] == pytest.approx(1 / 101)


def test_record_of_a_plain_image(bids_dir):
    path = write_nifti(bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    record = audit(path, bids_dir, metadata={"Manufacturer": "X"})
    assert record["readable"] and record["errors"] == []
    assert record["source"] == "sub-01/anat/sub-01_T1w.nii.gz"
    assert record["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    header = record["header"]
    assert len(header["shape"]) == 3 and all(z >= 3 for z in header["voxel_size_mm"])
    assert len(header["orientation"]) == 3 and header["datatype"] == "int16"
    assert header["sform_code"] in (0, 1, 2) and header["qform_code"] in (0, 1, 2)
    assert record["metadata"] == {"Manufacturer": "X"}
    assert len(record["file"]["sha256"]) == 64 and len(record["intensity"]["data_sha256"]) == 64
    assert record["flags"] == []


def test_data_hash_ignores_format_file_hash_does_not(bids_dir):
    data = np.random.default_rng(0).integers(0, 1000, (20, 20, 20)).astype(np.int16)
    a = audit(write_nifti(bids_dir / "a_T1w.nii.gz", data), bids_dir)
    b = audit(write_nifti(bids_dir / "b_T1w.nii", data), bids_dir)
    assert a["intensity"]["data_sha256"] == b["intensity"]["data_sha256"]
    assert a["file"]["sha256"] != b["file"]["sha256"]
    assert sha256_array(data) != sha256_array(data.astype(np.int32))


def test_scaling_is_recorded(bids_dir):
    img = nib.Nifti1Image(np.ones((20, 20, 20), np.int16), np.diag([8, 8, 8, 1]))
    img.header.set_slope_inter(2.0, 10.0)
    path = bids_dir / "s_T1w.nii.gz"
    img.to_filename(path)
    record = audit(path, bids_dir)
    assert record["header"]["scl_slope"] == 2.0 and record["header"]["scl_inter"] == 10.0
    assert record["intensity"]["max"] == 12.0


@pytest.mark.parametrize(
    ("data", "zooms", "flag"),
    [
        (np.ones((30, 30, 10), np.float32) * np.arange(10), (1, 1, 3), "anisotropic"),
        (np.random.default_rng(1).random((40, 40, 40)).astype(np.float32), (1, 1, 1), "tiny_fov"),
        (np.zeros((30, 30, 30), np.float32), (8, 8, 8), "empty"),
        (np.random.default_rng(2).random((30, 30, 30, 2)).astype(np.float32), (8, 8, 8), "4d"),
    ],
)
def test_flags(bids_dir, data, zooms, flag):
    path = write_nifti(bids_dir / f"{flag}_T1w.nii.gz", data, np.diag([*zooms, 1]))
    record = audit(path, bids_dir)
    assert record["readable"]
    assert flag in record["flags"]


def test_nan_and_inf_are_counted_and_flagged(bids_dir):
    data = np.random.default_rng(3).random((30, 30, 30)).astype(np.float32)
    data[0, 0, :5] = np.nan
    data[1, 1, 1] = np.inf
    record = audit(write_nifti(bids_dir / "nan_T1w.nii.gz", data, np.diag([8, 8, 8, 1])), bids_dir)
    assert record["intensity"]["nan_count"] == 5 and record["intensity"]["inf_count"] == 1
    assert "non_finite" in record["flags"]
    assert np.isfinite(record["intensity"]["max"])


def test_oblique_image_is_flagged(bids_dir):
    affine = grid_affine(
        orientation="LAS",
        voxel_size=(8, 8, 8),
        shape=(24, 28, 24),
        centre_mm=(0, 0, 0),
        oblique_deg=(12, 0, 0),
    )
    data = np.random.default_rng(4).random((24, 28, 24)).astype(np.float32)
    record = audit(write_nifti(bids_dir / "obl_T1w.nii.gz", data, affine), bids_dir)
    assert "oblique" in record["flags"] and record["header"]["orientation"] == "LAS"


def _truncated(path):
    write_nifti(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _garbage(path):
    path.write_bytes(b"this is not a nifti file" * 20)


def _zero(path):
    path.write_bytes(b"")


def _bad_gzip_payload(path):
    path.write_bytes(gzip.compress(b"\x00" * 100))


@pytest.mark.parametrize("corrupt", [_truncated, _garbage, _zero, _bad_gzip_payload])
def test_unreadable_files_give_a_record_not_an_exception(bids_dir, corrupt):
    path = bids_dir / "sub-09" / "anat" / "sub-09_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    corrupt(path)
    record = audit(path, bids_dir)
    assert record["readable"] is False
    assert "unreadable" in record["flags"]
    (message,) = record["errors"]
    assert message.startswith("sub-09/anat/sub-09_T1w.nii.gz:")
    assert "re-" in message  # says what to do

"""The audit of one anatomical image: what the file really holds, before anything touches it.

Pure functions on a file path; no writing. :func:`audit_t1w` never raises for bad data: an
unreadable image gives a record with ``readable: false`` and the reason, so the evidence of a
failure is kept like any other.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from .. import __version__
from ..kinds import REFERENCE_KIND, kind_of_file

#: Thresholds of the audit flags (recorded in every audit record).
FLAG_THRESHOLDS = {
    "anisotropy_ratio": 2.0,  # largest over smallest voxel edge
    "oblique_deg": 0.5,  # largest angle between a voxel axis and the nearest world axis
    "tiny_fov_mm": 100.0,  # smallest field-of-view edge
    "slice_thickness_mm": 0.5,  # a sidecar's SliceThickness this far from the largest voxel edge (and 15% of it)
}
PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(data: np.ndarray) -> str:
    """Hash of voxel values, independent of file format, compression and header.

    >>> a = np.arange(6, dtype=np.int16).reshape(1, 2, 3)
    >>> sha256_array(a) == sha256_array(a.copy(order="F"))
    True
    """
    digest = hashlib.sha256()
    arr = np.ascontiguousarray(data)
    digest.update(f"{arr.dtype.newbyteorder('<').str}{arr.shape}".encode())
    digest.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def load_spatial(path: Path) -> SpatialImage:
    """Load an image file that must hold a spatial image (NIfTI, ...)."""
    img = nib.load(path)
    if not isinstance(img, SpatialImage):
        raise ValueError(f"{type(img).__name__} is not a spatial image")
    return img


def header_problems(img: SpatialImage, kind: str = REFERENCE_KIND) -> list[str]:
    """What is wrong with an image header, in words (empty when it is sane).

    >>> header_problems(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)))
    []
    >>> header_problems(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)))
    ['2 dimensions (a T1w needs 3)']
    >>> header_problems(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), "FLAIR")
    ['2 dimensions (a FLAIR needs 3)']
    """
    problems = []
    shape = img.shape
    if len(shape) not in (3, 4):
        problems.append(f"{len(shape)} dimensions (a {kind} needs 3)")
    if any(n < 1 for n in shape):
        problems.append(f"empty dimension in shape {tuple(shape)}")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if len(shape) >= 3 and (not np.all(np.isfinite(zooms)) or np.any(zooms <= 0)):
        problems.append(f"voxel sizes {zooms.tolist()} are not positive numbers")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        problems.append("the voxel-to-world affine is missing, not finite or singular")
    return problems


def orientation_info(affine: np.ndarray) -> dict[str, Any]:
    """Axis codes and obliquity of an affine.

    >>> orientation_info(np.diag([-1.0, 1.0, 1.0, 1.0]))["orientation"]
    'LAS'
    """
    codes = "".join(nib.aff2axcodes(affine))
    angles = np.degrees(nib.affines.obliquity(affine))
    max_angle = float(np.max(np.abs(angles)))
    return {
        "orientation": codes,
        "obliquity_deg": round(max_angle, 4),
        "oblique": max_angle > FLAG_THRESHOLDS["oblique_deg"],
    }


def intensity_summary(data: np.ndarray) -> dict[str, Any]:
    """Range, moments, percentiles and non-finite counts of voxel values.

    >>> s = intensity_summary(np.array([0.0, 1.0, np.nan, np.inf]))
    >>> (s["nan_count"], s["inf_count"], s["max"])
    (1, 1, 1.0)
    """
    nan_count = int(np.count_nonzero(np.isnan(data)))
    inf_count = int(np.count_nonzero(np.isinf(data)))
    finite = data[np.isfinite(data)] if nan_count or inf_count else data.ravel()
    out: dict[str, Any] = {"nan_count": nan_count, "inf_count": inf_count, "finite_count": int(finite.size)}
    if finite.size == 0:
        out.update({"min": None, "max": None, "mean": None, "std": None, "zero_fraction": None, "percentiles": {}})
        return out
    values = np.percentile(finite, PERCENTILES)
    out.update(
        {
            "min": float(finite.min()),
            "max": float(finite.max()),
            "mean": float(finite.mean(dtype=np.float64)),
            "std": float(finite.std(dtype=np.float64)),
            "zero_fraction": float(np.count_nonzero(finite == 0) / finite.size),
            "percentiles": {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, values, strict=True)},
        }
    )
    return out


def audit_flags(header: dict[str, Any], intensity: dict[str, Any]) -> list[str]:
    """The audit flags of an image, from its header and intensity summaries."""
    flags = []
    zooms = header["voxel_size_mm"]
    if max(zooms) / min(zooms) > FLAG_THRESHOLDS["anisotropy_ratio"]:
        flags.append("anisotropic")
    if header["oblique"]:
        flags.append("oblique")
    if min(header["fov_mm"]) < FLAG_THRESHOLDS["tiny_fov_mm"]:
        flags.append("tiny_fov")
    if intensity["nan_count"] or intensity["inf_count"]:
        flags.append("non_finite")
    if intensity["finite_count"] == 0 or intensity["min"] == intensity["max"]:
        flags.append("empty")
    if header["ndim"] == 4:
        flags.append("4d")
    return flags


def sidecar_mismatches(header: dict[str, Any], metadata: dict[str, Any]) -> list[str]:
    """Where the sidecar and the header disagree about the grid, in words: a ``SliceThickness`` far from the voxel
    edge across the slices (the largest: a 3 mm FLAIR whose header says 1 mm voxels was resampled, or the sidecar
    belongs to another file).

    >>> sidecar_mismatches({"voxel_size_mm": [0.9, 0.9, 3.0]}, {"SliceThickness": 3})
    []
    >>> sidecar_mismatches({"voxel_size_mm": [1.0, 1.0, 1.0]}, {"SliceThickness": 3})
    ["the sidecar says SliceThickness 3 mm; the header's voxel edges are 1 x 1 x 1 mm"]
    """
    thickness = metadata.get("SliceThickness")
    if not isinstance(thickness, (int, float)) or isinstance(thickness, bool) or thickness <= 0:
        return []
    zooms = [float(z) for z in header["voxel_size_mm"]]
    tolerance = max(FLAG_THRESHOLDS["slice_thickness_mm"], 0.15 * float(thickness))
    if abs(float(thickness) - max(zooms)) <= tolerance:
        return []
    edges = " x ".join(f"{z:g}" for z in zooms)
    return [f"the sidecar says SliceThickness {thickness:g} mm; the header's voxel edges are {edges} mm"]


def _nifti_transforms(hdr: Any) -> dict[str, Any]:
    """qform/sform codes and matrices (None for formats without them)."""
    if not isinstance(hdr, nib.Nifti1Header):  # NIfTI-2 headers derive from NIfTI-1's
        return {"qform_code": None, "sform_code": None, "qform": None, "sform": None}
    return {
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "qform": hdr.get_qform().tolist(),
        "sform": hdr.get_sform().tolist(),
    }


def header_summary(img: SpatialImage) -> dict[str, Any]:
    hdr = img.header
    shape = [int(n) for n in img.shape]
    zooms = [float(z) for z in hdr.get_zooms()[:3]]
    # nibabel moves the header's scaling onto the array proxy when it loads a file
    slope, inter = getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)
    summary: dict[str, Any] = {
        "format": type(img).__name__,
        "shape": shape,
        "ndim": len(shape),
        "voxel_size_mm": zooms,
        "fov_mm": [round(n * z, 3) for n, z in zip(shape[:3], zooms, strict=True)],
        "datatype": str(hdr.get_data_dtype()),
        "scl_slope": None if slope is None else float(slope),
        "scl_inter": None if inter is None else float(inter),
        **_nifti_transforms(hdr),
        "affine": img.affine.tolist(),
        "xyzt_units": list(hdr.get_xyzt_units()) if hasattr(hdr, "get_xyzt_units") else None,
    }
    summary.update(orientation_info(img.affine))
    return summary


def audit_t1w(path: Path, *, bids_dir: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Audit one T1w file; the record is JSON-ready.

    The record holds the source path (relative to ``bids_dir``), file and voxel-data hashes, the
    header (shape, voxel size, orientation, obliquity, datatype, scaling, qform/sform), an
    intensity summary, the sidecar metadata and the flags. An unreadable file gives
    ``readable: false`` and ``errors`` saying what is wrong and what to do.
    """
    path = Path(path)
    rel = path.relative_to(bids_dir).as_posix() if path.is_relative_to(bids_dir) else str(path)
    record: dict[str, Any] = {
        "Sources": [f"bids:raw:{rel}"],
        "source": rel,
        "readable": False,
        "errors": [],
        "flags": [],
        "flag_thresholds": FLAG_THRESHOLDS,
        "metadata": dict(metadata or {}),
        "GeneratedBy": {"Name": "bidsdl", "Version": __version__},
    }
    try:
        record["file"] = {"sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    except OSError as exc:
        record["errors"].append(
            f"{rel}: cannot be read ({exc.strerror or exc}). Check the file exists and is readable."
        )
        record["flags"].append("unreadable")
        return record
    if record["file"]["size_bytes"] == 0:
        record["errors"].append(
            f"{rel}: the file is empty (0 bytes). Re-export or re-copy the image from the scanner or archive."
        )
        record["flags"].append("unreadable")
        return record
    try:
        img = load_spatial(path)
        problems = header_problems(img, kind_of_file(path))
        if problems:
            raise ValueError("; ".join(problems))
        header = header_summary(img)
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        record["errors"].append(
            f"{rel}: not a readable NIfTI image ({type(exc).__name__}: {exc}). The file is corrupt or "
            "truncated: re-export or re-copy it, or exclude the subject with --participant-label."
        )
        record["flags"].append("unreadable")
        return record
    intensity = intensity_summary(data)
    intensity["data_sha256"] = sha256_array(data)
    record.update(readable=True, header=header, intensity=intensity, flags=audit_flags(header, intensity))
    mismatches = sidecar_mismatches(header, record["metadata"])
    if mismatches:  # flagged with both values, never fixed silently: which one is right is the user's to say
        record["flags"].append("sidecar_mismatch")
        record["sidecar_mismatches"] = mismatches
    return record

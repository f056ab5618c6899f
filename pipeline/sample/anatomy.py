"""Synthetic anatomy for the sample dataset, built from nilearn's bundled MNI152 2009a template.

The template is brain-only; :func:`head_model` wraps it in scalp- and skull-like shells so that
registration and masking meet a head, as with real scans. :func:`deform` applies smooth, local,
invertible radial deformations (ventricular enlargement, hippocampal shrinkage) that carry the
diagnosis and age effects of the sample labels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..ops.template import TEMPLATE_SPACE, Template, load_template

__all__ = ["TEMPLATE_SPACE", "Template", "load_template"]


#: Centres (template mm) and widths of the structures the labels act on.
VENTRICLE_CENTRES = ((-8.0, -2.0, 16.0), (8.0, -2.0, 16.0))
VENTRICLE_SIGMA_MM = 13.0
HIPPOCAMPUS_CENTRES = ((-28.0, -22.0, -14.0), (28.0, -22.0, -14.0))
HIPPOCAMPUS_SIGMA_MM = 7.0

#: Shells outside the brain: (outer distance from the brain in mm, intensity relative to WM ~ 1).
HEAD_SHELLS = (
    (2.5, 0.10),  # cerebrospinal fluid
    (4.0, 0.04),  # inner table of the skull
    (6.0, 0.30),  # diploe (marrow)
    (8.0, 0.04),  # outer table
    (13.0, 0.85),  # subcutaneous fat
    (15.0, 0.45),  # skin and muscle
)


@functools.lru_cache(maxsize=1)
def default_head() -> np.ndarray:
    """The head model around the 1 mm template (computed once per process)."""
    return head_model(load_template(1))


def head_model(template: Template, shells: Sequence[tuple[float, float]] = HEAD_SHELLS) -> np.ndarray:
    """The template brain inside smooth scalp/skull-like shells, on the template grid."""
    distance = ndimage.distance_transform_edt(~template.brain_mask).astype(np.float32)
    head = np.zeros_like(template.t1)
    inner = 0.0
    for outer, value in shells:
        head[(distance > inner) & (distance <= outer)] = value
        inner = outer
    head = ndimage.gaussian_filter(head, sigma=0.8)
    head[template.brain_mask] = template.t1[template.brain_mask]
    return head


def radial_deform(
    image: np.ndarray,
    affine: np.ndarray,
    centre_mm: Sequence[float],
    sigma_mm: float,
    strength: float,
) -> np.ndarray:
    """Expand (strength > 0) or shrink (< 0) the structure around ``centre_mm`` smoothly.

    A point ``x`` takes the value at ``x - strength * g(x) * (x - c)``, with ``g`` a Gaussian of
    width ``sigma_mm``; for ``|strength| < 0.5`` the mapping is invertible. Only a box of three
    widths around the centre changes, which keeps this cheap.
    """
    if strength == 0:
        return image
    out = image.copy()
    inv = np.linalg.inv(affine)
    centre = np.asarray(centre_mm, dtype=float)
    centre_vox = inv[:3, :3] @ centre + inv[:3, 3]
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    radius = np.ceil(3 * sigma_mm / zooms).astype(int)
    lo = np.maximum(np.floor(centre_vox).astype(int) - radius, 0)
    hi = np.minimum(np.floor(centre_vox).astype(int) + radius + 1, image.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"))
    points = np.tensordot(affine[:3, :3], grid, axes=1) + affine[:3, 3, None, None, None]
    offset = points - centre[:, None, None, None]
    weight = np.exp(-(offset**2).sum(axis=0) / (2 * sigma_mm**2))
    source = points - strength * weight * offset
    source_vox = np.tensordot(inv[:3, :3], source, axes=1) + inv[:3, 3, None, None, None]
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = ndimage.map_coordinates(
        image, source_vox, order=1, mode="nearest"
    )
    return out


def deform(image: np.ndarray, affine: np.ndarray, *, ventricles: float, hippocampi: float) -> np.ndarray:
    """Enlarge the lateral ventricles and shrink the hippocampi by the given strengths."""
    for centre in VENTRICLE_CENTRES:
        image = radial_deform(image, affine, centre, VENTRICLE_SIGMA_MM, ventricles)
    for centre in HIPPOCAMPUS_CENTRES:
        image = radial_deform(image, affine, centre, HIPPOCAMPUS_SIGMA_MM, -hippocampi)
    return image


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees).

    >>> np.allclose(rotation_matrix([0, 0, 90]) @ [1, 0, 0], [0, 1, 0])
    True
    """
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def orientation_matrix(code: str) -> np.ndarray:
    """Signed permutation taking voxel axes to world (RAS) axes for an orientation code.

    >>> orientation_matrix("LPS") @ [1, 1, 1]
    array([-1., -1.,  1.])
    """
    ornt = nib.orientations.axcodes2ornt(tuple(code))
    matrix = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        matrix[int(world_axis), voxel_axis] = flip
    return matrix


def grid_affine(
    *,
    orientation: str,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    centre_mm: Sequence[float],
    oblique_deg: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Voxel-to-world affine of a field of view centred on ``centre_mm``, possibly tilted."""
    linear = rotation_matrix(oblique_deg) @ orientation_matrix(orientation) @ np.diag(voxel_size)
    half = (np.asarray(shape, dtype=float) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre_mm, dtype=float) - linear @ half
    return affine


def resample_into(
    image: np.ndarray,
    image_affine: np.ndarray,
    grid: np.ndarray,
    shape: Sequence[int],
    world_to_image_world: np.ndarray,
) -> np.ndarray:
    """Sample ``image`` on a grid: voxel -> world (``grid``) -> image world -> image voxel."""
    matrix = np.linalg.inv(image_affine) @ world_to_image_world @ grid
    return ndimage.affine_transform(
        image,
        matrix[:3, :3],
        offset=matrix[:3, 3],
        output_shape=tuple(shape),
        order=1,
        output=np.float32,
        cval=0.0,
    )


def bias_field(shape: Sequence[int], coefficients: Sequence[float]) -> np.ndarray:
    """Smooth multiplicative field: exp of a 2nd-order polynomial of normalised voxel coordinates.

    ``coefficients`` weigh x, y, z, x², y², z², xy, xz, yz.
    """
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    terms = (x, y, z, x**2 - 1 / 3, y**2 - 1 / 3, z**2 - 1 / 3, x * y, x * z, y * z)
    log_field = np.zeros(tuple(shape), dtype=np.float32)
    for c, term in zip(coefficients, terms, strict=True):
        log_field += np.float32(c) * term
    return np.exp(log_field)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (Rician), in place where possible."""
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += signal
    imag = rng.standard_normal(signal.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    return np.sqrt(real, out=real)

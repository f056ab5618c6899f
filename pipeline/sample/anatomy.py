"""Synthetic anatomy for the sample dataset, built from nilearn's bundled MNI152 2009a template.

The template is brain-only; :func:`head_model` wraps it in scalp- and skull-like shells and adds a
neck and shoulders below it (muscle, fat, vertebrae, the spinal cord, the airway), so that brain
extraction and registration meet a whole head with a large field of view, as with real scans.
:func:`deform` applies smooth, local, invertible radial deformations (ventricular enlargement,
hippocampal shrinkage) that carry the diagnosis and age effects of the sample labels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

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


#: How far the head model reaches below the template's grid (mm): the neck and the top of the shoulders.
NECK_LENGTH_MM = 100.0
#: Below this height (template mm) the neck replaces the shells that close the head under the brainstem.
NECK_TOP_MM = -74.0


@dataclass(frozen=True)
class Head:
    """A synthetic head on an RAS grid: intensities (WM ~ 0.9), the true brain mask and structure labels."""

    data: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    labels: np.ndarray


@functools.lru_cache(maxsize=1)
def default_head() -> Head:
    """The head model around the 1 mm template, with neck and shoulders (computed once per process)."""
    return head_model(load_template(1))


def head_model(
    template: Template, shells: Sequence[tuple[float, float]] = HEAD_SHELLS, neck_mm: float = NECK_LENGTH_MM
) -> Head:
    """The template brain inside smooth scalp/skull-like shells, on the template grid extended
    ``neck_mm`` downwards, where a neck and shoulders continue the head."""
    voxel = float(abs(template.affine[2, 2]))
    pad = round(neck_mm / voxel)
    affine = template.affine.copy()
    affine[2, 3] -= pad * voxel
    brain = np.pad(template.brain_mask, ((0, 0), (0, 0), (pad, 0)))
    t1 = np.pad(template.t1, ((0, 0), (0, 0), (pad, 0)))
    distance = ndimage.distance_transform_edt(~brain).astype(np.float32)
    head = np.zeros(brain.shape, dtype=np.float32)
    inner = 0.0
    for outer, value in shells:
        head[(distance > inner) & (distance <= outer)] = value
        inner = outer
    neck = neck_and_shoulders(brain.shape, affine)
    z = (np.arange(brain.shape[2]) * affine[2, 2] + affine[2, 3])[None, None, :]
    below = (z < NECK_TOP_MM) & ~brain
    head = np.where(below | (head == 0), neck, head)
    head = ndimage.gaussian_filter(head, sigma=0.8)
    head[brain] = t1[brain]
    labels = np.pad(structure_labels(template.resolution), ((0, 0), (0, 0), (pad, 0)))
    return Head(data=head, brain=brain, affine=affine, labels=labels)


def neck_and_shoulders(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Intensities of a neck (skin, fat, muscle, vertebral bodies, the spinal cord in its canal, the
    airway) from below the skull down, widening into shoulders; 0 outside the body."""
    x, y, z = (
        (np.arange(n) * affine[i, i] + affine[i, 3]).astype(np.float32).reshape([-1 if j == i else 1 for j in range(3)])
        for i, n in enumerate(shape)
    )
    depth = np.clip(-120.0 - z, 0, None)  # below the base of the neck
    half_width = 55.0 + 4.0 * depth  # the shoulders widen quickly
    half_depth = 55.0 + 0.8 * depth
    radial = np.sqrt((x / half_width) ** 2 + ((y + 20.0) / half_depth) ** 2)
    inside = (radial <= 1.0) & (z < -40.0)
    from_surface = (1.0 - radial) * np.minimum(half_width, half_depth)  # ~ mm to the skin
    out = np.where(from_surface < 1.5, 0.45, np.where(from_surface < 6.0, 0.85, 0.42)).astype(np.float32)
    disc = lambda cy, r: x**2 + (y - cy) ** 2 <= r**2  # noqa: E731
    out = np.where(disc(-22.0, 13.0), 0.05, out)  # vertebral body: cortical rim ...
    out = np.where(disc(-22.0, 11.5), 0.62, out)  # ... and marrow
    out = np.where(disc(-44.0, 10.0), 0.05, out)  # the canal's bone
    out = np.where(disc(-44.0, 8.0), 0.10, out)  # cerebrospinal fluid
    out = np.where(disc(-44.0, 5.0), 0.75, out)  # the spinal cord
    out = np.where(disc(8.0, 7.0) & (z > -150.0), 0.0, out)  # the airway
    return np.where(inside, out, 0.0).astype(np.float32)


def radial_deform(
    image: np.ndarray,
    affine: np.ndarray,
    centre_mm: Sequence[float],
    sigma_mm: float,
    strength: float,
    order: int = 1,
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
        image, source_vox, order=order, mode="nearest"
    )
    return out


def deform(
    image: np.ndarray, affine: np.ndarray, *, ventricles: float, hippocampi: float, order: int = 1
) -> np.ndarray:
    """Enlarge the lateral ventricles and shrink the hippocampi by the given strengths.

    ``order`` 0 (nearest neighbour) carries a label map through the same mapping as its image.
    """
    for centre in VENTRICLE_CENTRES:
        image = radial_deform(image, affine, centre, VENTRICLE_SIGMA_MM, ventricles, order)
    for centre in HIPPOCAMPUS_CENTRES:
        image = radial_deform(image, affine, centre, HIPPOCAMPUS_SIGMA_MM, -hippocampi, order)
    return image


#: The labelled structures of the sample (index -> name), as in a BIDS ``dseg.tsv``.
STRUCTURES = {
    1: "Left-Lateral-Ventricle",
    2: "Right-Lateral-Ventricle",
    3: "Left-Hippocampus",
    4: "Right-Hippocampus",
    5: "Left-Thalamus",
    6: "Right-Thalamus",
}
#: Ellipsoids (centre, semi-axes in mm) that bound the hippocampi and thalami on the template.
HIPPOCAMPUS_BOUNDS = ((28.0, -22.0, -14.0), (6.0, 16.0, 7.0))
THALAMUS_BOUNDS = ((11.0, -18.0, 7.0), (8.0, 14.0, 9.0))
#: The lateral ventricles: cerebrospinal fluid (template T1 below this) in a box around their centres.
VENTRICLE_T1_MAX = 0.45
VENTRICLE_BOX_MM = ((-32.0, 32.0), (-50.0, 32.0), (-6.0, 36.0))


def _world(shape: Sequence[int], affine: np.ndarray) -> list[np.ndarray]:
    """The RAS coordinates (mm) of a diagonal-affine grid, one broadcastable array per axis."""
    return [
        (np.arange(n) * affine[i, i] + affine[i, 3]).reshape([-1 if j == i else 1 for j in range(3)])
        for i, n in enumerate(shape)
    ]


@functools.lru_cache(maxsize=2)
def structure_labels(resolution: int = 1) -> np.ndarray:
    """The sample's structures on the template grid (uint8, indices of :data:`STRUCTURES`).

    Lateral ventricles: the template's dark CSF connected to the ventricle centres, split at the
    midline; hippocampi: grey matter inside an ellipsoid at each hippocampus; thalami: tissue
    inside an ellipsoid medial to each, outside the ventricles. Defined on the template once,
    then carried through each image's deformation and pose, so every image's truth is exact.
    """
    template = load_template(resolution)
    x, y, z = _world(template.t1.shape, template.affine)
    labels = np.zeros(template.t1.shape, dtype=np.uint8)
    (x0, x1), (y0, y1), (z0, z1) = VENTRICLE_BOX_MM
    box = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)
    csf = box & template.brain_mask & (template.t1 < VENTRICLE_T1_MAX)
    components, _ = ndimage.label(csf)
    inv = np.linalg.inv(template.affine)
    seeds = {int(components[tuple(np.rint(inv[:3, :3] @ c + inv[:3, 3]).astype(int))]) for c in VENTRICLE_CENTRES}
    ventricles = np.isin(components, sorted(seeds - {0}))
    labels[ventricles & (x < 0)] = 1
    labels[ventricles & (x >= 0)] = 2

    def ellipsoid(centre: Sequence[float], axes: Sequence[float], side: float) -> np.ndarray:
        return (
            ((x - side * centre[0]) / axes[0]) ** 2
            + ((y - centre[1]) / axes[1]) ** 2
            + ((z - centre[2]) / axes[2]) ** 2
        ) <= 1

    for side, (hippocampus, thalamus) in ((-1.0, (3, 5)), (1.0, (4, 6))):
        labels[ellipsoid(*HIPPOCAMPUS_BOUNDS, side) & (template.gm > 0.4) & (labels == 0)] = hippocampus
        tissue = (template.gm + template.wm) > 0.5
        labels[ellipsoid(*THALAMUS_BOUNDS, side) & tissue & (labels == 0)] = thalamus
    return labels


#: FLAIR-like intensities of the head model's T1-like values (WM ~ 0.85, GM ~ 0.6, CSF ~ 0.3 inside the brain):
#: CSF suppressed, grey matter brighter than white, fat and marrow moderate.
_FLAIR_BRAIN = ((0.0, 0.3, 0.45, 0.62, 0.85, 1.0), (0.04, 0.07, 0.5, 0.85, 0.58, 0.55))
_FLAIR_OUTSIDE = ((0.0, 0.1, 0.3, 0.45, 0.62, 0.85), (0.0, 0.04, 0.35, 0.38, 0.42, 0.7))


def flair_contrast(head: Head) -> np.ndarray:
    """The head model's intensities with a FLAIR-like contrast: its T1-like values mapped piecewise linearly,
    one mapping inside the brain and one outside.

    >>> h = Head(np.array([[[0.3, 0.6, 0.85]]], np.float32), np.ones((1, 1, 3), bool), np.eye(4), np.zeros((1, 1, 3)))
    >>> [round(float(v), 2) for v in flair_contrast(h).ravel()]
    [0.07, 0.81, 0.58]
    """
    inside = np.interp(head.data, *_FLAIR_BRAIN)
    outside = np.interp(head.data, *_FLAIR_OUTSIDE)
    return np.where(head.brain, inside, outside).astype(np.float32)


#: Kinds of images unlike a T1w of an adult head -> the scale of the head: a FLAIR stored as T1w, the T1-like
#: contrast inverted, an infant (a smaller head in the isointense phase: white matter as bright as grey), another
#: scanner's contrast (a non-linear intensity response).
UNFAMILIAR: dict[str, float] = {"flair": 1.0, "inverted": 1.0, "infant": 0.85, "scanner": 1.0}
#: The infant's brain contrast (the adult T1-like values mapped), and the other scanner's response exponent.
_INFANT_BRAIN = ((0.0, 0.3, 0.6, 0.85, 1.0), (0.0, 0.3, 0.62, 0.68, 0.7))
_SCANNER_GAMMA = 3.0


def unfamiliar_contrast(head: Head, kind: str) -> np.ndarray:
    """The head model's intensities for an image unlike an adult T1w (a kind of :data:`UNFAMILIAR`).

    >>> h = Head(np.array([[[0.0, 0.3, 0.85]]], np.float32), np.ones((1, 1, 3), bool), np.eye(4), np.zeros((1, 1, 3)))
    >>> [round(float(v), 2) for v in unfamiliar_contrast(h, "inverted").ravel()]
    [0.0, 0.75, 0.2]
    >>> [round(float(v), 2) for v in unfamiliar_contrast(h, "infant").ravel()]
    [0.0, 0.3, 0.68]
    """
    if kind == "flair":
        return flair_contrast(head)
    if kind == "inverted":
        return np.where(head.data > 0.02, 1.05 - head.data, 0.0).astype(np.float32)
    if kind == "infant":
        return np.where(head.brain, np.interp(head.data, *_INFANT_BRAIN), head.data).astype(np.float32)
    if kind == "scanner":
        return (np.clip(head.data, 0, None) ** _SCANNER_GAMMA * 1.3).astype(np.float32)
    raise ValueError(f"unknown kind of unfamiliar image {kind!r}: choose from {', '.join(UNFAMILIAR)}")


#: Lesions (white-matter hyperintensities, as in multiple sclerosis or small-vessel disease): how many per head,
#: their semi-axes (mm), and their intensity on the T1-like scale (hypointense) and on the FLAIR-like one (bright).
LESION_COUNT = (5, 15)
LESION_RADIUS_MM = (2.0, 7.0)
LESION_T1 = 0.5
LESION_FLAIR = 1.25


def lesion_map(head: Head, rng: np.random.Generator) -> np.ndarray:
    """Soft ellipsoidal lesions (values in [0, 1], float32, on the head's grid) in the white matter: a few large
    ones beside the ventricles and small ones scattered, as lesion datasets have. Drawn from ``rng`` alone."""
    voxel = float(abs(head.affine[0, 0]))
    white = ndimage.binary_erosion(head.brain & (head.data > 0.78), iterations=max(1, round(2 / voxel)))
    candidates = np.argwhere(white[::2, ::2, ::2]) * 2
    out = np.zeros(head.data.shape, dtype=np.float32)
    for _ in range(int(rng.integers(LESION_COUNT[0], LESION_COUNT[1] + 1))):
        centre = candidates[int(rng.integers(len(candidates)))]
        radii = rng.uniform(*LESION_RADIUS_MM) * rng.uniform(0.7, 1.3, 3) / voxel
        reach = np.ceil(radii.max() * 1.3).astype(int)
        lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, out.shape)
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        distance = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        out[box] = np.maximum(out[box], np.clip((1.15 - distance) / 0.3, 0, 1))
    return out * head.brain


def with_lesions(image: np.ndarray, lesions: np.ndarray, value: float) -> np.ndarray:
    """``image`` with the lesions' voxels blended towards ``value``."""
    return (image * (1 - lesions) + np.float32(value) * lesions).astype(np.float32)


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


#: How far (mm, root mean square per axis) and how smoothly (the width of the Gaussian that smooths its noise, mm)
#: the shape of an individual's head differs from the template's at ``individual_variation`` 1.
SHAPE_RMS_MM = 2.0
SHAPE_SMOOTHING_MM = 20.0
#: The grid (mm) the shape's displacement is interpolated on before it is sampled at an image's voxels.
SHAPE_GRID_MM = 4.0


@dataclass(frozen=True)
class Shape:
    """A smooth, invertible displacement of template space (mm): one individual's anatomy is the template's at
    ``x + d(x)``. ``field``: (3, i, j, k) on the grid ``affine``."""

    field: np.ndarray
    affine: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """``d`` at template points ``(3, ...)``."""
        inv = np.linalg.inv(self.affine)
        vox = np.tensordot(inv[:3, :3], points, axes=1) + inv[:3, 3].reshape((3,) + (1,) * (points.ndim - 1))
        return np.stack([ndimage.map_coordinates(c, vox, order=1, mode="nearest") for c in self.field])


@functools.lru_cache(maxsize=8)
def individual_shape(seed: int, rms_mm: float) -> Shape | None:
    """An individual's shape: Gaussian noise on a ``SHAPE_GRID_MM`` grid over the head, smoothed with a Gaussian of
    ``SHAPE_SMOOTHING_MM`` and scaled to ``rms_mm`` per axis; small and smooth enough to be invertible (at 2 mm, the
    Jacobian's determinant stays within about 0.7-1.4). None when ``rms_mm`` is 0."""
    if rms_mm <= 0:
        return None
    rng = np.random.default_rng([seed, 13])
    lo = np.array([-100.0, -135.0, -190.0])  # the head model's box, neck included (template mm)
    hi = np.array([100.0, 100.0, 110.0])
    n = np.ceil((hi - lo) / SHAPE_GRID_MM).astype(int) + 1
    sigma = SHAPE_SMOOTHING_MM / SHAPE_GRID_MM
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(tuple(n)), sigma, mode="wrap") for _ in range(3)])
    field *= np.float64(rms_mm) / np.sqrt(np.mean(field**2, axis=(1, 2, 3), keepdims=True))
    affine = np.diag([SHAPE_GRID_MM] * 3 + [1.0])
    affine[:3, 3] = lo
    return Shape(field=field.astype(np.float32), affine=affine)


def shape_coordinates(
    image_affine: np.ndarray, grid: np.ndarray, shape: Sequence[int], world_to_image_world: np.ndarray,
    displacement: Shape,
) -> np.ndarray:  # fmt: skip
    """Where each voxel of a grid samples an image (its voxel coordinates, ``(3, *shape)``) through an individual's
    shape: voxel -> world (``grid``) -> image world, + ``displacement`` there -> image voxel."""
    to_world = world_to_image_world @ grid
    inv = np.linalg.inv(image_affine)
    # the displacement is smooth: evaluated on a grid of about every 4th voxel, then interpolated to every voxel
    counts = [max(2, -(-(n - 1) // 4) + 1) for n in shape]
    coarse = np.stack(np.meshgrid(*[np.linspace(0, n - 1, m) for n, m in zip(shape, counts, strict=True)],
                                  indexing="ij"))  # fmt: skip
    points = np.tensordot(to_world[:3, :3], coarse, axes=1) + to_world[:3, 3][:, None, None, None]
    moved = np.tensordot(inv[:3, :3], displacement(points), axes=1).astype(np.float32)
    ratio = [(m - 1) / max(n - 1, 1) for n, m in zip(shape, counts, strict=True)]
    vox = np.stack([ndimage.affine_transform(c, ratio, output_shape=tuple(shape), order=1, mode="nearest")
                    for c in moved])  # fmt: skip
    matrix = inv @ to_world
    index = np.indices(tuple(shape), dtype=np.float32)
    vox += np.tensordot(matrix[:3, :3].astype(np.float32), index, axes=1)
    vox += matrix[:3, 3].astype(np.float32)[:, None, None, None]
    return vox


def resample_into(
    image: np.ndarray,
    image_affine: np.ndarray,
    grid: np.ndarray,
    shape: Sequence[int],
    world_to_image_world: np.ndarray,
    order: int = 1,
    displacement: Shape | np.ndarray | None = None,
) -> np.ndarray:
    """Sample ``image`` on a grid: voxel -> world (``grid``) -> image world (+ ``displacement`` there: an
    individual's shape, or the coordinates :func:`shape_coordinates` made of it once for several images on the same
    grid) -> image voxel (``order`` 0: labels)."""
    if displacement is None:
        matrix = np.linalg.inv(image_affine) @ world_to_image_world @ grid
        return ndimage.affine_transform(
            image,
            matrix[:3, :3],
            offset=matrix[:3, 3],
            output_shape=tuple(shape),
            order=order,
            output=np.float32 if order else image.dtype,
            cval=0.0,
        )
    if isinstance(displacement, Shape):
        displacement = shape_coordinates(image_affine, grid, shape, world_to_image_world, displacement)
    return ndimage.map_coordinates(image, displacement, order=order, output=np.float32 if order else image.dtype,
                                   cval=0.0)  # fmt: skip


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

"""The MNI152 2009a template that ships with nilearn (no download), and grids derived from it."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..derivatives import TEMPLATE_SPACE as TEMPLATE_SPACE  # the derivatives table's names, re-exported
from ..derivatives import resolution_label as resolution_label
from .images import array_to_sitk, sitk_affine, sitk_to_array

#: nilearn's bundled files (read with nibabel: importing nilearn.datasets costs seconds per process).
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: nilearn's rule for the template's brain mask: T1 above this value.
BRAIN_MASK_THRESHOLD = 0.2


def _data_folder() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nilearn is not installed: it ships the MNI152 template bidsdl uses")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


class Template:
    """nilearn's MNI152 2009a, at 1 mm or block-averaged to 2, 3 or 4 mm (the coarse grids of registrations).

    ``t1`` is brain-only (float32, WM ~ 0.9); ``brain_mask`` is T1 > 0.2 (as nilearn defines it);
    ``gm``/``wm`` are tissue probability maps. Each part is read on first use only.
    """

    def __init__(self, resolution: int = 1):
        if resolution not in (1, 2, 3, 4):
            raise ValueError("the template is available at 1, 2, 3 or 4 mm")
        self.resolution = resolution

    def _load(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        img = nib.Nifti1Image.from_filename(_data_folder() / _FILES[part])
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        data /= data.max()  # as nilearn's loaders do: the files hold 0-255
        if self.resolution == 1:
            return data, np.asarray(img.affine, dtype=float)
        small = sitk.BinShrink(array_to_sitk(data, img.affine), [self.resolution] * 3)  # averages; exact geometry
        return sitk_to_array(small).astype(np.float32), sitk_affine(small)

    @functools.cached_property
    def _t1(self) -> tuple[np.ndarray, np.ndarray]:
        return self._load("t1")

    @property
    def t1(self) -> np.ndarray:
        return self._t1[0]

    @property
    def affine(self) -> np.ndarray:
        return self._t1[1]

    @functools.cached_property
    def brain_mask(self) -> np.ndarray:
        return self.t1 > BRAIN_MASK_THRESHOLD

    @functools.cached_property
    def gm(self) -> np.ndarray:
        return self._load("gm")[0]

    @functools.cached_property
    def wm(self) -> np.ndarray:
        return self._load("wm")[0]

    @property
    def resolution_mm(self) -> float:
        return float(np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)).mean())


@functools.lru_cache(maxsize=4)
def load_template(resolution: int = 1) -> Template:
    """The bundled MNI152 2009a template at 1, 2, 3 or 4 mm (parts load on first use; no download)."""
    return Template(resolution)


def model_grid_description(resolution_mm: float) -> str:
    """``Resolution`` in the sidecar of every file on the model grid (BIDS requires it with ``res``).

    >>> model_grid_description(2.0)
    '2 mm isotropic, the template grid cropped to the template brain + 4 mm'
    """
    return f"{resolution_mm:g} mm isotropic, the template grid cropped to the template brain + 4 mm"


def cropped_grid(
    brain_mask: np.ndarray, affine: np.ndarray, resolution_mm: float, margin_mm: float = 4.0
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RAS grid at ``resolution_mm`` covering the brain's bounding box plus a margin.

    This is the array learning uses: every subject resampled onto the same small grid.
    """
    idx = np.argwhere(brain_mask)
    corners = np.array([idx.min(axis=0), idx.max(axis=0)], dtype=float)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(axis=0) - margin_mm, world.max(axis=0) + margin_mm
    shape = tuple(int(np.ceil((hi[i] - lo[i]) / resolution_mm)) + 1 for i in range(3))
    grid = np.diag([resolution_mm] * 3 + [1.0])
    grid[:3, 3] = lo
    return grid, (shape[0], shape[1], shape[2])

"""What ran, where: software versions, hardware and container, recorded with every invocation."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from . import __version__
from .config import available_cpus, available_memory_gb

#: Packages whose versions determine bidsdl's results.
KEY_PACKAGES = (
    "numpy",
    "scipy",
    "pandas",
    "nibabel",
    "nilearn",
    "nipype",
    "pybids",
    "SimpleITK",
    "torch",
    "deepbet",
    "monai",
    "scikit-learn",
    "jinja2",
    "matplotlib",
)


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def detect_container() -> dict[str, str] | None:
    """The container bidsdl runs in, if any (for ``GeneratedBy.Container``)."""
    kind = os.environ.get("BIDSDL_CONTAINER")
    if not kind and (os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")):
        kind = "singularity"
    if not kind and Path("/.dockerenv").exists():
        kind = "docker"
    if not kind:
        return None
    tag = os.environ.get("BIDSDL_IMAGE_TAG") or os.environ.get("SINGULARITY_NAME") or ""
    return {"Type": kind, "Tag": tag} if tag else {"Type": kind}


def git_revision() -> str | None:
    """The commit of a source checkout bidsdl runs from, when there is one."""
    package_dir = Path(__file__).resolve().parent
    if not (package_dir.parent / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(package_dir.parent), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def environment_record(argv: list[str]) -> dict[str, Any]:
    return {
        "bidsdl_version": __version__,
        "git_revision": git_revision(),
        "command_line": ["bidsdl", *argv],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpus_available": available_cpus(),
        "memory_gb": round(available_memory_gb(), 2),
        "container": detect_container(),
        "packages": package_versions(),
        "threads_env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
            )
            if k in os.environ
        },
    }

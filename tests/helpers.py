"""Helpers for building small BIDS datasets and checking that they stay untouched."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def small_head(name: str, *, voxel_scale: float = 3.0) -> nib.Nifti1Image:
    """A realistic synthetic head (the sample generator's) on coarse voxels: processes in seconds."""
    from pipeline.sample import anatomy
    from pipeline.sample.generate import ImageSpec, SampleOptions, make_image

    seed = zlib.crc32(name.encode())
    spec = ImageSpec(subject="x", session="01", age=70.0, diagnosis="CN", site="siteA", seed=seed,
                     ventricles=0.0, hippocampi=0.0)  # fmt: skip
    img, _, _, _ = make_image(spec, anatomy.default_head(), SampleOptions(voxel_scale=voxel_scale))
    return img


# a small network on a small grid: a package of it writes and loads in milliseconds
SHAPE = (16, 18, 16)
TINY = {"channels": [2, 2, 4, 4, 4], "hidden": [8], "dropout": 0.0}


def make_package(
    folder: Path, *, task: str = "classification", n_folds: int = 2, seed: int = 0, resolution: float = 4.0,
    training: list[tuple[str, str]] = (("sub-01", "hash01"),), space: str = "MNI152NLin2009aSym",
) -> Path:  # fmt: skip
    """A complete package of a small untrained network (every fold differently initialised)."""
    import torch

    from pipeline.learn import package
    from pipeline.learn.models import ModelConfig, build_model
    from pipeline.learn.train import save_weights

    n_outputs = 2 if task == "classification" else 1
    config = ModelConfig("conv5fc3", n_outputs, SHAPE, TINY)
    weights = {}
    for fold in range(n_folds):
        torch.manual_seed(seed * 10 + fold)
        network = build_model(config)
        network.set_reference(torch.full((1, 1, *SHAPE), 0.5), 2.0)
        weights[f"fold-{fold}.safetensors"] = folder / f"w{seed}-{fold}.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(network, weights[f"fold-{fold}.safetensors"])
    record = {
        "name": f"diagnosis_conv5fc3_{seed}",
        "task": task,
        "target": "diagnosis" if task == "classification" else "age",
        "classes": ["CN", "AD"] if task == "classification" else [],
        "positive_class": "AD" if task == "classification" else None,
        "threshold": 0.4,
        "model": config.to_dict(),
        "input": {"space": space, "resolution_mm": resolution, "res": f"{resolution:g}", "shape": list(SHAPE)},
        "target_scale": [{"mean": 70.0, "sd": 5.0}] * n_folds if task == "regression" else None,
        "training_subjects": [
            {"participant_id": p, "splits": ["train"], "images": [{"data_sha256": h}]} for p, h in training
        ],
        "test_subjects": ["sub-09"],
        "metrics": {"test": {"metrics": {"roc_auc": 0.9}, "ci": {"roc_auc": [0.8, 1.0]}}},
        "data": {"n_subjects": 4},
        "model_card": {"intended_use": "tests", "limitations": "none"},
    }
    return package.write_package(folder / "models", record=record, weights=weights, files={"config.json": {}})


def write_nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` on ``affine`` (default 8 mm voxels), or a small realistic head when ``data`` is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        small_head(path.name).to_filename(path)
        return path
    if affine is None:
        affine = np.diag([8.0, 8.0, 8.0, 1.0])  # 192 x 224 x 192 mm for 24 x 28 x 24: a head's field of view
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def make_bids(
    root: Path,
    subjects: dict[str, list[str]] | None = None,
    *,
    participants: list[str] | None = None,
    description: dict | None = None,
) -> Path:
    """A BIDS dataset: ``subjects`` maps labels to T1w names relative to ``sub-<label>/``."""
    subjects = subjects if subjects is not None else {s: [f"anat/sub-{s}_T1w.nii.gz"] for s in ("01", "02", "03")}
    root.mkdir(parents=True, exist_ok=True)
    if description is not False:
        desc = description or {"Name": "test dataset", "BIDSVersion": "1.9.0"}
        (root / "dataset_description.json").write_text(json.dumps(desc))
    rows = participants if participants is not None else [f"sub-{s}" for s in subjects]
    ages = {pid: 60 + i for i, pid in enumerate(rows)}
    lines = ["participant_id\tage\tdiagnosis"] + [
        f"{p}\t{ages[p]}\t{'AD' if i % 2 else 'CN'}" for i, p in enumerate(rows)
    ]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    for label, names in subjects.items():
        for name in names:
            write_nifti(root / f"sub-{label}" / name)
            sidecar = (root / f"sub-{label}" / name).with_suffix("").with_suffix(".json")
            sidecar.write_text(json.dumps({"Manufacturer": "TestVendor", "MagneticFieldStrength": 3}))
    return root


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every file and the list of folders under ``root``."""
    state: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            state[rel + "/"] = (0, "dir")
        else:
            state[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def set_read_only(root: Path, read_only: bool = True) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        if read_only:
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        else:
            path.chmod(mode | stat.S_IWUSR)


#: A small, fast training configuration (the model grid at 4 mm: 39 x 48 x 41 voxels).
#: The suite's participant runs take the affine path unless a test is about the nonlinear registration: SyN and the
#: morphometry after it have their own tests (tests/integration/test_morphometry.py), at a coarse warp grid; this keeps
#: `make test` within its time. ``run_cli`` adds it to a participant run that names no --registration.
AFFINE = ("--registration", "affine")
#: The nonlinear registration at a coarse grid (the shared learning sample's preprocessing).
WARP = ("--registration", "syn", "--warp-resolution", "4")

#: One held-out test set, not the default nested cross-validation of a cohort below 300 participants.
ONE_TEST_SET = ("--outer-folds", "0")
FAST = ("--target", "diagnosis", "--positive-class", "AD", "--n-folds", "2", "--epochs", "2", "--batch-size", "4",
        "--model-resolution", "4", "--test-size", "0.25", "--nprocs", "1", *ONE_TEST_SET)  # fmt: skip


@contextlib.contextmanager
def preprocessed_sample(root: Path, options: Any, *participant_args: str) -> Iterator[tuple[Path, Path, int]]:
    """A generated dataset (``options``: :class:`~pipeline.sample.generate.SampleOptions`) in ``root/bids``, read-only,
    and its participant level (model grid 4 mm, ``participant_args``) in ``root/derivatives``: (bids, derivatives,
    exit code). Afterwards, checks that nothing in the dataset changed."""
    from pipeline.cli.run import main
    from pipeline.sample.generate import write_sample_dataset

    bids, out = root / "bids", root / "derivatives"
    write_sample_dataset(bids, options)
    before = snapshot(bids)
    set_read_only(bids)
    code = main([str(bids), str(out), "participant", "--nprocs", "2", "--model-resolution", "4", *participant_args])
    yield bids, out, code
    set_read_only(bids, False)
    assert snapshot(bids) == before, f"bidsdl changed files in BIDS_DIR {bids}"


def fresh_output(source: Path, target: Path) -> Path:
    """A copy of the participant derivatives (without Nipype's work folder) for one group run."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".bidsdl_work", "group.html", "learn", "models"))
    return target


def parallel_group_jobs(bids: Path, out: Path, options: list[str], flag: str, values: tuple[int, ...]) -> list[str]:
    """``bidsdl BIDS OUT group *options flag K`` for every K at once (as SLURM array tasks); their outputs, after
    checking that each succeeded."""
    import subprocess
    import sys

    bidsdl = Path(sys.executable).parent / "bidsdl"
    jobs = [subprocess.Popen([str(bidsdl), str(bids), str(out), "group", *options, flag, str(k)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in values]  # fmt: skip
    outputs = []
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output
        outputs.append(output)
    return outputs


def the_package(out: Path) -> Path:
    (package,) = sorted((out / "models").iterdir())
    return package


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def external_links(html: str) -> list[str]:
    """Links of a report that leave it (anything but anchors, data: URIs and sibling subject reports)."""
    parser = _Links()
    parser.feed(html)
    return [u for u in parser.urls if not u.startswith(("#", "data:")) and not re.fullmatch(r"sub-\w+\.html", u)]


#: Skip reason of the tests that open a report in a real browser.
NO_CHROMIUM = "no chromium to open the report in"


def browser_dom(report: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM of ``report`` as headless chromium renders it, offline, from a copy of the file alone (opened at
    ``#fragment`` when given)."""
    copy = tmp_path / f"copied_{report.name}"
    shutil.copy(report, copy)
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", copy.as_uri() + (f"#{fragment}" if fragment else "")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def validator_issues(dataset: Path) -> list[dict]:
    """The official BIDS validator's issues on ``dataset`` (bids-validator-deno's JSON report)."""
    executable = Path(sys.executable).parent / "bids-validator-deno"
    assert executable.exists(), "bids-validator-deno is missing: pip install -e '.[test]' -c constraints.txt"
    result = subprocess.run([str(executable), str(dataset), "--json"], capture_output=True, text=True, timeout=600)
    return json.loads(result.stdout)["issues"]["issues"]

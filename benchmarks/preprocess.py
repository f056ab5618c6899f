"""Participant preprocessing: speed, memory and registration accuracy, with antspyx side by side.

Usage: python benchmarks/preprocess.py [--subjects 3] [--nprocs N] [--real-dir DIR]

1. Wall time and peak RSS (whole process tree, sampled) of `bidsdl participant` for one 1 mm
   sample subject, figures and report included.
2. Registration accuracy on sample subjects against their recorded true transforms: mean
   displacement over template brain voxels (mm), with bidsdl's N4 + registration timed alone.
3. The same for antspyx (N4 + `Affine`, N4 + `AffineFast`) when it is installed, in the same run.
4. With --real-dir: real heads (no truth): time and NCC with the template after registration.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.ops import bias, iqm, registration
from pipeline.ops.images import array_to_sitk, nib_to_sitk
from pipeline.ops.resample import resample
from pipeline.ops.template import load_template
from pipeline.sample.generate import SampleOptions, write_sample_dataset


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants (MB), from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += [child for child, parent in parents.items() if parent == pid]
    return total / 1e6


def run_participant(bids: Path, out: Path, label: str, nprocs: int) -> tuple[float, float, int]:
    command = [str(Path(sys.executable).parent / "bidsdl"), str(bids), str(out), "participant",
               "--participant-label", label, "--nprocs", str(nprocs), "-q"]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.2)
    return time.perf_counter() - start, peak, process.returncode


def displacement_mm(template_to_t1w: sitk.Transform, truth: np.ndarray) -> float:
    template = load_template(2)
    xyz = np.argwhere(template.brain_mask)[::5] @ template.affine[:3, :3].T + template.affine[:3, 3]
    got = np.array([template_to_t1w.TransformPoint((-x, -y, z)) for x, y, z in xyz]) * [-1, -1, 1]
    want = xyz @ truth[:3, :3].T + truth[:3, 3]
    return float(np.linalg.norm(got - want, axis=1).mean())


def ncc_after(template_to_t1w: sitk.Transform, corrected: sitk.Image) -> float:
    template = load_template(1)
    registered = resample(corrected, template_to_t1w, template.affine, template.t1.shape)
    return iqm.ncc(registered[template.brain_mask], template.t1[template.brain_mask])


def bidsdl_register(path: Path) -> tuple[sitk.Transform, sitk.Image, float]:
    start = time.perf_counter()
    img = nib.as_closest_canonical(nib.load(path))
    corrected, _ = bias.n4_correct(nib_to_sitk(img))
    template = load_template(2)
    transform, _ = registration.register_to_template(
        corrected, array_to_sitk(template.t1, template.affine), template.brain_mask, template.affine
    )
    return transform, corrected, time.perf_counter() - start


def ants_register(path: Path, kind: str, work: Path) -> tuple[sitk.Transform, float]:
    import ants

    template = load_template(1)
    fixed_path = work / "template.nii.gz"
    if not fixed_path.exists():
        nib.Nifti1Image(template.t1, template.affine).to_filename(fixed_path)
    start = time.perf_counter()
    moving = ants.n4_bias_field_correction(ants.image_read(str(path)))
    result = ants.registration(fixed=ants.image_read(str(fixed_path)), moving=moving, type_of_transform=kind,
                               outprefix=str(work / f"{kind}_"))  # fmt: skip
    elapsed = time.perf_counter() - start
    return sitk.ReadTransform(result["fwdtransforms"][-1]), elapsed


def real_heads(real_dir: Path, ants_kinds: list[str], tmp_path: Path) -> None:
    print("\nReal heads (no truth): time and NCC with the template inside its brain after registration", flush=True)
    for path in sorted(real_dir.glob("*.nii*")):
        transform, corrected, seconds = bidsdl_register(path)
        line = f"  {path.name}: bidsdl_s={seconds:.1f} bidsdl_ncc={ncc_after(transform, corrected):.3f}"
        for kind in ants_kinds:
            work = tmp_path / f"real_{kind}_{path.name}"
            work.mkdir(exist_ok=True)
            ants_transform, ants_seconds = ants_register(path, kind, work)
            line += f"  ants_{kind}_s={ants_seconds:.1f} ants_{kind}_ncc={ncc_after(ants_transform, corrected):.3f}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--real-dir", type=Path)
    parser.add_argument("--no-ants", action="store_true", help="skip antspyx even when it is installed")
    args = parser.parse_args()
    try:
        import ants  # noqa: F401

        ants_kinds = [] if args.no_ants else ["Affine", "AffineFast"]
    except ImportError:
        ants_kinds = []
        print("antspyx is not installed (pip install antspyx): its columns are skipped")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.nprocs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        bids = tmp_path / "bids"
        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=3, two_session_fraction=0.0,
                                                 n_jobs=args.nprocs))  # fmt: skip
        wall, peak, code = run_participant(bids, tmp_path / "out", "01", args.nprocs)
        shape = nib.load(next(bids.glob("sub-01/ses-01/anat/*_T1w.nii*"))).shape
        print(f"participant level, one 1 mm subject {shape}: exit={code} wall_s={wall:.1f} peak_rss_mb={peak:.0f}",
              flush=True)  # fmt: skip

        rows = []
        for path in sorted(bids.glob("sub-*/ses-*/anat/*_T1w.nii*")):
            truth_file = bids / "sourcedata" / "truth" / f"{path.name.split('.')[0]}.json"
            truth = np.asarray(json.loads(truth_file.read_text())["TemplateToT1w"])
            transform, _, seconds = bidsdl_register(path)
            row = {"image": path.name, "bidsdl_s": seconds, "bidsdl_mm": displacement_mm(transform, truth)}
            for kind in ants_kinds:
                work = tmp_path / f"ants_{path.name}"
                work.mkdir(exist_ok=True)
                ants_transform, ants_seconds = ants_register(path, kind, work)
                row[f"ants_{kind}_s"], row[f"ants_{kind}_mm"] = ants_seconds, displacement_mm(ants_transform, truth)
            rows.append(row)
        print("\nN4 + affine registration, sample subjects (error: mean displacement over brain voxels vs truth)")
        for row in rows:
            print("  " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
        print("  mean: " + "  ".join(f"{k}={v:.2f}" for k, v in means.items()))
        for kind in ants_kinds:
            print(f"  speed-up over antspyx N4 + {kind}: {means[f'ants_{kind}_s'] / means['bidsdl_s']:.1f}x")

        if args.real_dir:
            real_heads(args.real_dir, ants_kinds, tmp_path)


if __name__ == "__main__":
    main()

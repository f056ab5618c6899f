"""Participant preprocessing: speed, memory, registration accuracy and brain-mask quality.

Usage: python benchmarks/preprocess.py [--subjects 6] [--nprocs 2] [--large-fov-fraction 0.5] [--real-dir DIR]

1. One 1 mm sample head alone through `bidsdl participant` (what one SLURM array task does): wall time
   and peak memory of the whole process tree (workers and the brain-extraction helper included; RSS,
   which counts the pages forked workers share in each of them, and PSS, which divides them), and the
   wall time of each step (from Nipype's records).
2. Every sample head (some with neck and shoulders in a 270 mm field of view, misplaced up to 15 degrees
   and 20 mm, in various axis orders): registration error against the recorded true transform (mean
   displacement over template brain voxels, mm), brain-mask recall (share of the true brain inside the
   mask) and leak (share of the mask outside the true brain), the quality verdict.
3. antspyx (N4 + `Affine`, N4 + `AffineFast`) on the same heads when it is installed: time and error.
4. With --real-dir: real heads (no truth), each also re-stored in another axis order, rotated and shifted
   in its header: time, NCC with the template, mask agreement (Dice), volumes, verdict.
Targets (2 cores): <= 30 s and <= 2 GB per head; error <= 1 mm on every sample head; recall >= 0.99 and
leak <= 0.05 on every head. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.ops import bias
from pipeline.ops.images import nib_to_sitk
from pipeline.ops.template import TEMPLATE_SPACE, load_template
from pipeline.sample.anatomy import rotation_matrix
from pipeline.sample.generate import SampleOptions, write_sample_dataset

#: The steps of one image's workflow whose times are printed, in order.
STEPS = ("prepare", "audit", "brain_extraction", "n4", "register", "to_template", "iqms", "reportlets", "mesh")


def tree_memory_mb(root: int) -> tuple[float, float]:
    """Memory of a process and all its descendants (MB), from /proc: the sum of their RSS (pages shared by
    forked workers counted in each) and of their PSS (shared pages divided among their sharers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    rss = pss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Rss:", "Pss:")):
                    kb = int(line.split()[1])
                    rss, pss = (rss + kb, pss) if line.startswith("Rss:") else (rss, pss + kb)
        except (OSError, ValueError):
            pass
        stack += [child for child, parent in parents.items() if parent == pid]
    return rss / 1e3, pss / 1e3


def run_participant(bids: Path, out: Path, work: Path, labels: list[str] | None, nprocs: int) -> tuple[float, str, int]:
    command = [str(Path(sys.executable).parent / "bidsdl"), str(bids), str(out), "participant", "-w", str(work),
               "--nprocs", str(nprocs), "-q"]  # fmt: skip
    if labels:
        command += ["--participant-label", *labels]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak_rss = peak_pss = 0.0
    while process.poll() is None:
        rss, pss = tree_memory_mb(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    memory = f"peak_rss_mb={peak_rss:.0f} peak_pss_mb={peak_pss:.0f}"
    return time.perf_counter() - start, memory, process.returncode


def step_times(work: Path) -> dict[str, float]:
    """Seconds per step of the images in a Nipype work folder (summed over images)."""
    from nipype.utils.filemanip import loadpkl

    times: dict[str, float] = {}
    for result in work.glob("bidsdl_wf/sub_*_wf/anat_*_wf/*/*/result_*.pklz"):
        step = result.parent.name
        duration = getattr(loadpkl(result).runtime, "duration", None)
        if duration is not None:
            key = step if step in STEPS else "sinks" if step.startswith("ds_") else step
            times[key] = times.get(key, 0.0) + float(duration)
    return times


def displacement_mm(template_to_t1w: sitk.Transform, truth: np.ndarray) -> float:
    template = load_template(2)
    xyz = np.argwhere(template.brain_mask)[::5] @ template.affine[:3, :3].T + template.affine[:3, 3]
    got = np.array([template_to_t1w.TransformPoint((-x, -y, z)) for x, y, z in xyz]) * [-1, -1, 1]
    want = xyz @ truth[:3, :3].T + truth[:3, 3]
    return float(np.linalg.norm(got - want, axis=1).mean())


def mask_quality(mask_path: Path, truth_path: Path) -> tuple[float, float]:
    """Recall and leak of a T1w-space (RAS) brain mask against the true one (on the original grid)."""
    mask = np.asanyarray(nib.load(mask_path).dataobj) > 0
    truth = np.asanyarray(nib.as_closest_canonical(nib.load(truth_path)).dataobj) > 0
    return float((mask & truth).sum() / truth.sum()), float((mask & ~truth).sum() / max(mask.sum(), 1))


def derivative(out: Path, source: Path, bids: Path, suffix: str) -> Path:
    stem = source.name.split("_T1w")[0]
    return out / source.parent.relative_to(bids) / f"{stem}_{suffix}"


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


def sample_heads(bids: Path, out: Path, ants_kinds: list[str], tmp: Path) -> None:
    rows = []
    for source in sorted(bids.glob("sub-*/ses-*/anat/*_T1w.nii*")):
        stem = source.name.split(".")[0]
        truth_file = bids / "sourcedata" / "truth" / f"{stem}.json"
        truth = json.loads(truth_file.read_text())
        xfm = derivative(out, source, bids, f"from-T1w_to-{TEMPLATE_SPACE}_mode-image_xfm.txt")
        iqm_file = derivative(out, source, bids, "desc-iqm_T1w.json")
        row: dict[str, object] = {
            "image": source.name.split("_T1w")[0],
            "fov_mm": "270" if truth["large_fov"] else "212",
            "axes": truth["orientation"],
        }
        best = np.asarray(truth.get("TemplateToT1wBestAffine", truth["TemplateToT1w"]))  # an individual's shape
        if xfm.exists():
            row["error_mm"] = displacement_mm(sitk.ReadTransform(str(xfm)), best)
            recall, leak = mask_quality(derivative(out, source, bids, "desc-brain_mask.nii.gz"),
                                        truth_file.with_name(truth["BrainMask"]))  # fmt: skip
            row.update(recall=recall, leak=leak, verdict=json.loads(iqm_file.read_text())["qc"]["verdict"])
        else:
            row["error_mm"] = float("nan")
        for kind in ants_kinds:
            work = tmp / f"ants_{kind}_{stem}"
            work.mkdir(exist_ok=True)
            transform, seconds = ants_register(source, kind, work)
            row[f"ants_{kind}_s"] = seconds
            row[f"ants_{kind}_mm"] = displacement_mm(transform, best)
        rows.append(row)
    print("\nSample heads (error: mean displacement over template brain voxels vs truth; mask vs true brain):")
    for row in rows:
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    errors = [float(r["error_mm"]) for r in rows]  # type: ignore[arg-type]
    recalls = [float(r["recall"]) for r in rows if "recall" in r]  # type: ignore[arg-type]
    leaks = [float(r["leak"]) for r in rows if "leak" in r]  # type: ignore[arg-type]
    print(f"  worst: error_mm={max(errors):.3f} (target <= 1)  recall={min(recalls):.4f} (>= 0.99)  "
          f"leak={max(leaks):.4f} (<= 0.05)  over {len(rows)} heads")  # fmt: skip


def real_dataset(real_dir: Path, bids: Path) -> None:
    """Each real head as it is, and once more in LIA order, rotated and shifted in its header."""
    rng = np.random.default_rng(0)
    (bids / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "real heads", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id"]
    for path in sorted(real_dir.glob("*.nii*")):
        label = "".join(c for c in path.name.split(".")[0] if c.isalnum())
        img = nib.load(path)
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("LIA"))
        pose = np.eye(4)
        pose[:3, :3] = rotation_matrix(rng.uniform(-12, 12, 3))
        pose[:3, 3] = rng.uniform(-15, 15, 3)
        moved = nib.Nifti1Image(nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt),
                                pose @ img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape))  # fmt: skip
        for name, image in ((label, img), (f"{label}moved", moved)):
            folder = bids / f"sub-{name}" / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            image.to_filename(folder / f"sub-{name}_T1w.nii.gz")
            rows.append(f"sub-{name}")
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")


def real_heads(real_dir: Path, tmp: Path, nprocs: int) -> None:
    bids, out = tmp / "real", tmp / "real_out"
    real_dataset(real_dir, bids)
    wall, peak, code = run_participant(bids, out, tmp / "real_work", None, nprocs)
    n = len(list(bids.glob("sub-*")))
    print(f"\nReal heads ({n} images: each as stored and re-stored LIA, rotated <= 12 deg, shifted <= 15 mm): "
          f"exit={code} wall_s={wall:.1f} ({wall / n:.1f} per head) {peak}")  # fmt: skip
    keys = ("registration_ncc", "mask_dice", "brain_volume_ml", "gm_volume_ml", "wm_volume_ml", "cjv", "snr_wm",
            "brain_fov_edge_mm2")  # fmt: skip
    for record_path in sorted(out.glob("sub-*/anat/*_desc-iqm_T1w.json")):
        record = json.loads(record_path.read_text())
        metrics = "  ".join(f"{k}={record['metrics'][k]:.3g}" for k in keys)
        print(f"  {record_path.parts[-3]}: {record['qc']['verdict']} {record['qc']['flags'] or ''}  {metrics}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--large-fov-fraction", type=float, default=0.5)
    parser.add_argument("--real-dir", type=Path)
    parser.add_argument("--no-ants", action="store_true", help="skip antspyx even when it is installed")
    parser.add_argument("--alone-only", action="store_true", help="only the one-head-alone runs (step 1)")
    args = parser.parse_args()
    try:
        import ants  # noqa: F401

        ants_kinds = [] if args.no_ants else ["Affine", "AffineFast"]
    except ImportError:
        ants_kinds = []
        print("antspyx is not installed (pip install antspyx): its columns are skipped")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.nprocs)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        bids = tmp / "bids"
        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=3, two_session_fraction=0.0,
                                                 large_fov_fraction=args.large_fov_fraction, n_jobs=args.nprocs))
        for label in ("01", "02"):
            truth = json.loads(next((bids / "sourcedata" / "truth").glob(f"sub-{label}_*.json")).read_text())
            work = tmp / f"work_{label}"
            wall, peak, code = run_participant(bids, tmp / f"one_{label}", work, [label], args.nprocs)
            steps = step_times(work)
            fov = "x".join(str(n) for n in truth["shape"])
            print(f"participant level, one 1 mm head alone (sub-{label}, {fov} voxels, "
                  f"{'270' if truth['large_fov'] else '212'} mm head to foot): exit={code} wall_s={wall:.1f} "
                  f"{peak}")  # fmt: skip
            print("  steps (s): " + "  ".join(f"{s}={steps[s]:.1f}" for s in (*STEPS, "sinks") if s in steps))
        if args.alone_only:
            return
        out = tmp / "out"
        wall, peak, code = run_participant(bids, out, tmp / "work", None, args.nprocs)
        n = len(list(bids.glob("sub-*/ses-*/anat/*_T1w.nii*")))
        print(f"participant level, all {n} heads, --nprocs {args.nprocs}: exit={code} wall_s={wall:.1f} "
              f"({wall / n:.1f} per head) {peak}")  # fmt: skip
        sample_heads(bids, out, ants_kinds, tmp)
        if ants_kinds:
            one = next(bids.glob("sub-01/ses-*/anat/*_T1w.nii*"))
            start = time.perf_counter()
            bias.n4_correct(nib_to_sitk(nib.as_closest_canonical(nib.load(one))))
            print(f"  (N4 on sub-01 in its Otsu foreground, as antspyx's columns include it: "
                  f"{time.perf_counter() - start:.1f} s)")  # fmt: skip
        if args.real_dir:
            real_heads(args.real_dir, tmp, args.nprocs)


if __name__ == "__main__":
    main()

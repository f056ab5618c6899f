"""The nonlinear registration (ANTs SyN) and morphometry against the affine alone, head by head.

    python benchmarks/registration.py                         # 4 sample heads at 1 mm
    python benchmarks/registration.py --heads 2 --real ../shared/data/real   # plus real T1w files (any .nii.gz)

Runs the participant level twice on the same heads, ``--registration affine`` and the default (SyN at the 2 mm
grid), one participant at a time with 2 threads, and prints per head: the wall time of each run and their ratio,
SyN's own seconds, the share of folded voxels, the template-brain Dice after the affine and after the warp, the
verdict; then the medians. Prints figures; asserts nothing. Targets (issue 35): SyN <= 60 s per head on 2 cores,
folded voxels < 0.1%, the warp's overlap at least the affine's on every head.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIN = Path(sys.executable).parent


def _run(bids: Path, out: Path, label: str, *options: str) -> float:
    started = time.monotonic()
    subprocess.run([str(BIN / "bidsdl"), str(bids), str(out), "participant", "--participant-label", label,
                    "--nprocs", "1", "--omp-nthreads", "2", "-w", str(out.parent / f"{out.name}_work"), *options],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.monotonic() - started


def _dataset(work: Path, heads: int, real: Path | None) -> Path:
    """Sample heads (1 mm, half with a neck), and the real T1w files of ``real`` as more participants."""
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    bids = work / "bids"
    write_sample_dataset(bids, SampleOptions(n_subjects=heads, seed=3, two_session_fraction=0, large_fov_fraction=0.5,
                                             n_jobs=2))  # fmt: skip
    for i, path in enumerate(sorted(real.glob("*.nii*")) if real else []):
        folder = bids / f"sub-real{i + 1:02d}" / "anat"
        folder.mkdir(parents=True)
        shutil.copyfile(path, folder / f"sub-real{i + 1:02d}_T1w.nii.gz")
        table = bids / "participants.tsv"
        columns = table.read_text().splitlines()[0].count("\t")
        with open(table, "a") as handle:
            handle.write(f"sub-real{i + 1:02d}" + "\tn/a" * columns + "\n")
    return bids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--real", type=Path, help="a folder of real T1w files (read only; nothing is copied here)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl_registration_"))
    bids = _dataset(work, args.heads, args.real)
    labels = sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*") if p.is_dir())
    print(f"{'head':10} {'affine s':>9} {'syn s':>7} {'ratio':>6} {'SyN s':>6} {'folded':>8} {'Dice aff':>9} "
          f"{'Dice warp':>9}  verdict")  # fmt: skip
    rows = []
    for label in labels:
        affine_s = _run(bids, work / "affine", label, "--skip-bids-validation", "--registration", "affine")
        syn_s = _run(bids, work / "syn", label, "--skip-bids-validation")
        records = sorted((work / "syn" / f"sub-{label}").glob("**/*_desc-iqm_T1w.json"))
        warps = sorted((work / "syn" / f"sub-{label}").glob("**/*_from-T1w_*desc-nonlinear_xfm.json"))
        if not records or not warps:
            print(f"{label:10} {affine_s:9.1f} {syn_s:7.1f}  (no warp: the participant failed before it)")
            continue
        iqm, warp = json.loads(records[0].read_text()), json.loads(warps[0].read_text())
        quality, seconds = warp["Quality"], warp["Registration"]["Seconds"]
        rows.append((affine_s, syn_s, seconds, quality))
        print(f"{label:10} {affine_s:9.1f} {syn_s:7.1f} {syn_s / affine_s:6.2f} {seconds:6.1f} "
              f"{quality['warp_folded_share']:8.5f} {quality['warp_dice_affine']:9.4f} {quality['warp_dice']:9.4f}  "
              f"{iqm['qc']['verdict']} {','.join(iqm['qc']['flags'])}")  # fmt: skip
    if rows:
        median = lambda i: float(np.median([r[i] for r in rows]))  # noqa: E731
        worse = sum(r[3]["warp_dice"] < r[3]["warp_dice_affine"] for r in rows)
        print(f"median: affine {median(0):.1f} s, with SyN {median(1):.1f} s (x{median(1) / median(0):.2f}), SyN "
              f"itself {median(2):.1f} s; largest folded share {max(r[3]['warp_folded_share'] for r in rows):.5f}; "
              f"the warp's Dice below the affine's on {worse} of {len(rows)} heads")  # fmt: skip
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()

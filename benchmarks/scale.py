"""bidsdl at the scale of UK Biobank or ABCD: ten thousand participants.

Usage: python benchmarks/scale.py [--participants 10000] [--root DIR] [--keep] [--skip-splits]

Builds a BIDS dataset of N participants with one tiny T1w each (4^3 voxels: this measures bookkeeping, not image
processing), then prints, each as ``name: value`` (targets for 10,000 participants in brackets):

- the first ``--list-participants`` (builds the index) [<= 60 s] and the next one (reuses it) [<= 10 s];
- an array task's start-up, from its launch to the moment its participant's workflow starts [<= 5 s];
- the group level on synthetic participant-level records (audit, quality metrics and status for every participant,
  a planted duplicate, a few QC failures): gathering, dataset audit, QC table, manifest and report [<= 60 s with
  the splits, <= 4 GB];
- the learning study's splits and leakage checks (identical and near-identical images, site) on a cohort of N
  model-grid images of 23 x 27 x 23 voxels (the cohort cache's time printed apart);
- peak RSS of each command.

Asserts nothing; tests never time anything.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BIDSDL = str(Path(sys.executable).parent / "bidsdl")
SITES = ("siteA", "siteB", "siteC", "siteD")


def _tiny_nifti(data: np.ndarray, voxel_mm: float = 2.0) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(data, np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0]))
    return gzip.compress(image.to_bytes(), compresslevel=1)


def build_tree(root: Path, n: int, *, seed: int = 0) -> None:
    """N participants, one 4^3 T1w and its sidecar each, participants.tsv with age, diagnosis and site."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "scale", "BIDSVersion": "1.9.0"}))
    (root / "README").write_text("Synthetic dataset of bidsdl's scale benchmark.\n")
    rows = ["participant_id\tage\tdiagnosis\tsite"]
    for i in range(n):
        label = f"{i:05d}"
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{label}_T1w.nii.gz").write_bytes(_tiny_nifti(rng.integers(0, 1000, (4, 4, 4)).astype(np.int16)))
        (anat / f"sub-{label}_T1w.json").write_text(json.dumps({"Manufacturer": "Siemens", "MagneticFieldStrength": 3}))
        rows.append(f"sub-{label}\t{50 + i % 40}\t{'AD' if rng.random() < 0.4 else 'CN'}\t{SITES[i % 4]}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def write_records(bids: Path, out: Path, n: int, *, seed: int = 1) -> None:
    """What the participant level leaves for the group level: per participant its audit, its quality metrics and
    verdict (the real assessment of metrics drawn around a real run's), and a status record 'done'."""
    from pipeline import derivatives
    from pipeline.bids.audit import audit_t1w
    from pipeline.ops import iqm

    rng = np.random.default_rng(seed)
    template = audit_t1w(bids / "sub-00000" / "anat" / "sub-00000_T1w.nii.gz", bids_dir=bids,
                         metadata={"Manufacturer": "Siemens", "MagneticFieldStrength": 3})  # fmt: skip
    centre = {"snr_wm": 25.0, "snr_gm": 11.0, "cnr": 2.6, "cjv": 0.5, "efc": 0.6, "fber": 200.0,
              "registration_ncc": 0.94, "mask_dice": 0.985, "wm_dice": 0.52, "brain_volume_ml": 1200.0,
              "gm_wm_ratio": 1.4, "bias_range": 0.29, "brain_fov_edge_mm2": 0.0,
              "brain_fov_bottom_mm2": 0.0}  # fmt: skip
    derivatives.ensure_dataset_description(out, derivatives.dataset_description(
        bids_dir=bids, source_description=None, container=None))  # fmt: skip
    for i in range(n):
        label = f"{i:05d}"
        source = f"sub-{label}/anat/sub-{label}_T1w.nii.gz"
        digest = f"{rng.integers(1 << 62):016x}" * 4
        if i == n - 1:  # the same scan under two IDs
            digest = f"{np.random.default_rng(seed).integers(1 << 62):016x}" * 4
        audit = {**template, "source": source, "Sources": [f"bids:raw:{source}"],
                 "file": {**template["file"], "sha256": digest},
                 "intensity": {**template["intensity"], "data_sha256": digest}}  # fmt: skip
        metrics = {k: float(v * rng.normal(1.0, 0.05)) for k, v in centre.items()}
        if i % 997 == 13:  # a failed registration now and then
            metrics.update(registration_ncc=0.3, mask_dice=0.6, wm_dice=0.1)
        assessment = iqm.assess(metrics)
        record = {"source": source, "Sources": audit["Sources"], "metrics": metrics, "qc": assessment,
                  "flags": list(audit["flags"]) + assessment["flags"]}  # fmt: skip
        anat = out / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{label}_desc-audit_T1w.json").write_text(json.dumps(audit))
        (anat / f"sub-{label}_desc-iqm_T1w.json").write_text(json.dumps(record))
        log = out / f"sub-{label}" / "log"
        log.mkdir()
        (log / f"sub-{label}_status.json").write_text(json.dumps({
            "participant_id": f"sub-{label}", "state": "done", "run_id": "synthetic", "errors": [],
            "images": [{"source": source, "audit": f"sub-{label}/anat/sub-{label}_desc-audit_T1w.json",
                        "state": "done"}], "outputs": [],
        }))  # fmt: skip


def _run(argv: list[str], *, stop_at: str | None = None) -> dict[str, float]:
    """Run a bidsdl command; its wall time, peak RSS (MB) and, with ``stop_at``, the seconds until a line of its
    console output contains ``stop_at`` (then it is stopped with SIGTERM)."""
    started = time.monotonic()
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    tail: list[str] = []

    def watch() -> None:
        assert job.stderr is not None
        for line in job.stderr:
            tail.append(line)
            if stop_at and stop_at in line and "at_s" not in seen:
                seen["at_s"] = time.monotonic() - started
                job.send_signal(signal.SIGTERM)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    _, status, usage = os.wait4(job.pid, 0)
    job.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    if stop_at and "at_s" not in seen:
        raise SystemExit(f"{' '.join(argv)} never said {stop_at!r}:\n{''.join(tail[-20:])}")
    if not stop_at and job.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} exited {job.returncode}:\n{''.join(tail[-20:])}")
    return {"wall_s": time.monotonic() - started, "peak_rss_mb": usage.ru_maxrss / 1024, **seen}


def _phase_times(out: Path) -> dict[str, float]:
    """The group level's own timings of its steps, from the newest group log."""
    log = sorted((out / "logs").glob("*_group_*"))[-1] / "bidsdl.log"
    times = {}
    for line in log.read_text().splitlines():
        if "Timing:" in line:
            name, _, value = line.split("Timing:", 1)[1].strip().rpartition(" ")
            times[name] = float(value.removesuffix("s"))
    return times


def time_splits(bids: Path, out: Path, n: int, work: Path) -> dict[str, float]:
    """The study's first two stages on synthetic model-grid images: cohort cache, then splits and leakage checks."""
    import nibabel as nib
    import pandas as pd

    from pipeline import derivatives
    from pipeline.cli.parser import parse_args
    from pipeline.group import study_settings
    from pipeline.learn.cohort import model_input_path
    from pipeline.learn.study.stages import gather_cohort, split_and_check
    from pipeline.qc import load_qc

    rng = np.random.default_rng(2)
    mean = rng.normal(100.0, 20.0, (23, 27, 23)).astype(np.float32)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    for source in manifest["source"]:
        path = model_input_path(out, source, 4.0)
        data = mean + rng.normal(0.0, 10.0, mean.shape).astype(np.float32)
        if source.startswith(f"sub-{n - 1:05d}"):  # the planted duplicate: the same derivative as the first
            data = np.asarray(nib.load(model_input_path(out, manifest["source"][0], 4.0)).dataobj)
        with derivatives.atomic_path(path) as tmp:
            tmp.write_bytes(_tiny_nifti(data.astype(np.float32), 4.0))
    config = parse_args([str(bids), str(out), "group", "--target", "diagnosis", "--model-resolution", "4"])
    settings = study_settings(config)
    qc = load_qc(out)
    started = time.monotonic()
    cohort = gather_cohort(manifest, output_dir=out, cache_dir=work / "learn_cache", qc=qc, settings=settings)
    cached = time.monotonic()
    try:
        split = split_and_check(cohort, output_dir=out, settings=settings)
        checks = {c["name"]: c["result"] for c in split.checks}
    except Exception as exc:  # the planted duplicate leaks across splits: that is the checks working
        checks = {"leak found": str(exc)[:80]}
    done = time.monotonic()
    print(f"splits_checks: {json.dumps(checks)}")
    return {"cohort_cache_s": cached - started, "splits_and_leakage_s": done - cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=10_000)
    parser.add_argument("--root", type=Path, help="work here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    parser.add_argument("--skip-splits", action="store_true", help="leave out the splits stage")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bidsdl-scale-"))
    n = args.participants
    bids, out, work = root / "bids", root / "out", root / "work"
    try:
        started = time.monotonic()
        build_tree(bids, n)
        print(f"participants: {n}")
        print(f"tree_build_s: {time.monotonic() - started:.1f}")
        base = [BIDSDL, str(bids), str(out), "participant", "-w", str(work)]
        first = _run([*base, "--list-participants"])
        again = _run([*base, "--list-participants"])
        print(f"list_participants_first_s: {first['wall_s']:.2f} (builds the index; target <= 60)")
        print(f"list_participants_indexed_s: {again['wall_s']:.2f} (target <= 10)")
        print(f"list_participants_peak_rss_mb: {max(first['peak_rss_mb'], again['peak_rss_mb']):.0f}")
        starts = [_run([*base, "--participant-index", str(i), "--nprocs", "1"], stop_at="Workflow starts")
                  for i in (n // 3, n // 2, n - 2)]  # fmt: skip
        start_up = sorted(s["at_s"] for s in starts)
        print(f"array_task_start_up_s: {start_up[1]:.2f} (median of {len(starts)}: "
              f"{', '.join(f'{s:.2f}' for s in start_up)}; target <= 5)")  # fmt: skip
        print(f"array_task_peak_rss_mb: {max(s['peak_rss_mb'] for s in starts):.0f}")
        for leftover in out.glob("sub-*"):  # what the stopped tasks began
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        started = time.monotonic()
        write_records(bids, out, n)
        print(f"records_write_s: {time.monotonic() - started:.1f}")
        group = _run([BIDSDL, str(bids), str(out), "group", "-w", str(work)])
        print(f"group_s: {group['wall_s']:.2f} (gathering, dataset audit, QC, manifest, report)")
        for name, seconds in _phase_times(out).items():
            print(f"group_{name.replace(' ', '_')}_s: {seconds:.2f}")
        print(f"group_peak_rss_mb: {group['peak_rss_mb']:.0f} (target <= 4096)")
        print(f"group_report_mb: {(out / 'group.html').stat().st_size / 1e6:.2f}")
        if not args.skip_splits:
            splits = time_splits(bids, out, n, work)
            print(f"cohort_cache_s: {splits['cohort_cache_s']:.2f} (not in the target: the cohort is read once)")
            print(f"splits_and_leakage_s: {splits['splits_and_leakage_s']:.2f}")
            print(f"splits_peak_rss_mb: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
                  "(this process: cohort cache, splits and checks)")
            total = group["wall_s"] + splits["splits_and_leakage_s"]
            print(f"group_with_splits_s: {total:.2f} (target <= 60)")
    finally:
        if args.keep or args.root:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

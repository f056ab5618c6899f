"""How far bidsdl gets on a small cohort of individuals, every participant tested once (issue 35's targets), and the
benchmark that chose the deep model's defaults for tens of participants.

    python benchmarks/small_cohort.py                                   # 80 participants, the default study
    python benchmarks/small_cohort.py --subjects 40 --seed 36 --studies T1w GM+logjacobian GM+logjacobian+augment
    python benchmarks/small_cohort.py --work W --skip-participant       # reuse W's preprocessed cohort

A generated cohort (individual anatomy: head size by sex, own ventricle and hippocampus sizes, head shape; a graded
disease with label noise; effect strength 1.5 by default: a morphometric ceiling of ~0.8-0.85) is preprocessed with
the nonlinear registration, then studied by nested cross-validation once per named study (a set of group-level
options: the candidates below), each with its linear baselines (the same inputs; the regional volumes). Prints,
beside the cohort's best possible AUC and morphometric ceiling, each model's pooled ROC-AUC with its 95% interval,
the target (0.5 + 0.9 x (ceiling - 0.5)), the deep-vs-linear paired difference and what the learning curve says;
each study's results.json is kept as WORK/results-<study>.json (studies of the same inputs share a folder).

Choosing defaults: run the candidates on a *tuning* cohort (another seed, e.g. 40 participants of seed 36), pick by
the pooled ROC-AUC there, then report the chosen default on the *evaluation* cohort (seed 35, 80 participants),
which no choice looked at. Asserts nothing.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIN = Path(sys.executable).parent
MORPHOMETRY = ("--inputs", "GM", "logjacobian")
#: The candidate studies: name -> group-level options (beside --target, --outer-folds and --model-resolution).
STUDIES: dict[str, tuple[str, ...]] = {
    "T1w": ("--inputs", "T1w"),
    "T1w+augment": ("--inputs", "T1w", "--augment"),
    "GM+logjacobian": MORPHOMETRY,
    "GM+logjacobian+augment": (*MORPHOMETRY, "--augment"),
    "GM+WM+CSF+logjacobian": ("--inputs", "GM", "WM", "CSF", "logjacobian"),
    "GM+logjacobian+wd1e-2": (*MORPHOMETRY, "--weight-decay", "1e-2"),
    "GM+logjacobian+3folds": (*MORPHOMETRY, "--n-folds", "3"),
    "default": (),  # whatever bidsdl does without options
}


def _run(*args: str) -> float:
    started = time.monotonic()
    subprocess.run([str(BIN / "bidsdl"), *args], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def _auc(evaluation: dict[str, Any]) -> str:
    value, (low, high) = evaluation["metrics"]["roc_auc"], evaluation["ci"]["roc_auc"]
    return f"{value:.3f} (95% CI {low:.3f}-{high:.3f}, half-width {(high - low) / 2:.3f})"


def _show(name: str, results: dict[str, Any], seconds: float, target: float) -> dict[str, Any]:
    print(f"\n{name} (inputs {'+'.join(results.get('inputs') or ['T1w'])}): {results['nested']['n_tested']} "
          f"participants each tested once, {seconds:.0f} s")  # fmt: skip
    print(f"  deep model:               {_auc(results['test'])}")
    row = {"study": name, "deep": results["test"]["metrics"]["roc_auc"], "seconds": round(seconds)}
    for key, label in (("baseline", "linear, same inputs:     "), ("volumes_baseline", "linear, regional volumes:")):
        linear = results.get(key)
        if not linear:
            continue
        difference = linear["comparison"]["roc_auc"]
        print(f"  {label} {_auc(linear['test'])}; deep minus it {difference['difference']:+.3f} "
              f"(95% CI {difference['ci'][0]:+.3f} to {difference['ci'][1]:+.3f})")  # fmt: skip
        if linear.get("learning_curve_outlook"):
            print(f"    learning curve: {linear['learning_curve_outlook']['text']}")
        row[key] = linear["test"]["metrics"]["roc_auc"]
    best = max([results["test"]] + [results[k]["test"] for k in ("baseline", "volumes_baseline") if results.get(k)],
               key=lambda e: e["metrics"]["roc_auc"])  # fmt: skip
    verdict = "reached" if best["metrics"]["roc_auc"] >= target else "not reached"
    print(f"  best model: ROC-AUC {best['metrics']['roc_auc']:.3f}: target {target:.3f} {verdict}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=80)
    parser.add_argument("--effect-strength", type=float, default=1.5)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument("--voxel-scale", type=float, default=2.0, help="the sample's voxel size (mm)")
    parser.add_argument("--model-resolution", type=float, default=4.0, help="the learning grid (mm)")
    parser.add_argument("--outer-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=35)
    parser.add_argument("--studies", nargs="+", choices=STUDIES, default=["default"])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--skip-participant", action="store_true", help="reuse WORK's preprocessed cohort")
    parser.add_argument("--group-args", nargs=argparse.REMAINDER, default=[], help="more group-level options")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl-small-cohort-"))
    bids, out = work / "bids", work / "derivatives"
    resolution = ["--model-resolution", f"{args.model_resolution:g}"]
    if not args.skip_participant:
        from pipeline.sample.generate import SampleOptions, write_sample_dataset

        started = time.monotonic()
        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=args.seed, n_jobs=2,
                                                 effect_strength=args.effect_strength, label_noise=args.label_noise,
                                                 voxel_scale=args.voxel_scale, two_session_fraction=0.0))  # fmt: skip
        print(f"sample: {args.subjects} participants in {time.monotonic() - started:.0f} s")
        seconds = _run(str(bids), str(out), "participant", "--nprocs", "2", *resolution)
        print(f"participant level (nonlinear registration): {seconds:.0f} s, {seconds / args.subjects:.1f} s each")
    truth = json.loads((bids / "sourcedata" / "generation.json").read_text())["learning_truth"]
    ceiling = truth["morphometric_ceiling"]["auc"]
    target = 0.5 + 0.9 * (ceiling - 0.5)
    print(f"best possible AUC (hidden severity): {truth['best_possible_auc']:.3f}; morphometric ceiling (true "
          f"volumes): {ceiling:.3f}; target: {target:.3f}")  # fmt: skip
    rows = []
    for name in args.studies:
        options = STUDIES[name]
        seconds = _run(str(bids), str(out), "group", "--target", "diagnosis", "--positive-class", "AD",
                       "--outer-folds", str(args.outer_folds), *resolution, *options, *args.group_args)  # fmt: skip
        found = max((out / "learn" / "target-diagnosis").glob("arch-*/results.json"), key=lambda p: p.stat().st_mtime)
        shutil.copyfile(found, work / f"results-{name}.json")
        rows.append(_show(name, json.loads(found.read_text()), seconds, target))
    print("\nstudy                         deep   linear  volumes  seconds")
    for row in sorted(rows, key=lambda r: -r["deep"]):
        print(f"{row['study']:<29} {row['deep']:.3f}  {row.get('baseline', float('nan')):.3f}   "
              f"{row.get('volumes_baseline', float('nan')):.3f}  {row['seconds']:>6}")  # fmt: skip


if __name__ == "__main__":
    main()

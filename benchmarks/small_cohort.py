"""How far bidsdl gets on a small cohort of individuals, every participant tested once (issue 35's targets).

    python benchmarks/small_cohort.py                                   # 80 participants, 5 outer folds
    python benchmarks/small_cohort.py --subjects 40 --voxel-scale 2 --group-args --model-resolution 4 --epochs 15
    python benchmarks/small_cohort.py --work W --skip-participant       # reuse W's preprocessed cohort

A generated cohort (individual anatomy: head size by sex, own ventricle and hippocampus sizes, head shape; a graded
disease with label noise) is preprocessed with the nonlinear registration, then studied by nested cross-validation
twice: the network on the T1w and on morphometry maps (GM, logjacobian), each with its linear baselines (the same
inputs; the regional volumes). Prints, beside the cohort's best possible AUC and morphometric ceiling, each model's
pooled ROC-AUC with its 95% interval, the target (0.5 + 0.9 x (ceiling - 0.5)), the deep-vs-linear paired
difference and what the learning curve says. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIN = Path(sys.executable).parent
STUDIES = {"T1w": (), "GM+logjacobian": ("--inputs", "GM", "logjacobian")}


def _run(*args: str) -> float:
    started = time.monotonic()
    subprocess.run([str(BIN / "bidsdl"), *args], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def _auc(evaluation: dict[str, Any]) -> str:
    value, (low, high) = evaluation["metrics"]["roc_auc"], evaluation["ci"]["roc_auc"]
    return f"{value:.3f} (95% CI {low:.3f}-{high:.3f}, half-width {(high - low) / 2:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=80)
    parser.add_argument("--effect-strength", type=float, default=1.0)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument("--voxel-scale", type=float, default=1.0)
    parser.add_argument("--outer-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=35)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--skip-participant", action="store_true", help="reuse WORK's preprocessed cohort")
    parser.add_argument("--group-args", nargs=argparse.REMAINDER, default=[], help="more group-level options")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl-small-cohort-"))
    bids, out = work / "bids", work / "derivatives"
    if not args.skip_participant:
        from pipeline.sample.generate import SampleOptions, write_sample_dataset

        started = time.monotonic()
        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=args.seed, n_jobs=2,
                                                 effect_strength=args.effect_strength, label_noise=args.label_noise,
                                                 voxel_scale=args.voxel_scale, two_session_fraction=0.0))  # fmt: skip
        print(f"sample: {args.subjects} participants in {time.monotonic() - started:.0f} s")
        seconds = _run(str(bids), str(out), "participant", "--nprocs", "2")
        print(f"participant level (nonlinear registration): {seconds:.0f} s, {seconds / args.subjects:.1f} s each")
    truth = json.loads((bids / "sourcedata" / "generation.json").read_text())["learning_truth"]
    ceiling = truth["morphometric_ceiling"]["auc"]
    target = 0.5 + 0.9 * (ceiling - 0.5)
    print(f"best possible AUC (hidden severity): {truth['best_possible_auc']:.3f}; morphometric ceiling (true "
          f"volumes): {ceiling:.3f}; target: {target:.3f}")  # fmt: skip
    for name, inputs in STUDIES.items():
        seconds = _run(str(bids), str(out), "group", "--target", "diagnosis", "--positive-class", "AD",
                       "--outer-folds", str(args.outer_folds), *inputs, *args.group_args)  # fmt: skip
        folder = "arch-conv5fc3" + ("" if not inputs else "_inputs-" + name)
        results = json.loads((out / "learn" / "target-diagnosis" / folder / "results.json").read_text())
        print(f"\n{name}: {results['nested']['n_tested']} participants each tested once, {seconds:.0f} s")
        print(f"  deep model:              {_auc(results['test'])}")
        for key, label in (("baseline", "linear, same inputs:    "), ("volumes_baseline", "linear, regional volumes:")):
            linear = results.get(key)
            if not linear:
                continue
            difference = linear["comparison"]["roc_auc"]
            print(f"  {label} {_auc(linear['test'])}; deep minus it {difference['difference']:+.3f} "
                  f"(95% CI {difference['ci'][0]:+.3f} to {difference['ci'][1]:+.3f})")  # fmt: skip
            if linear.get("learning_curve_outlook"):
                print(f"    learning curve: {linear['learning_curve_outlook']['text']}")
        best = max([results["test"]] + [results[k]["test"] for k in ("baseline", "volumes_baseline") if results.get(k)],
                   key=lambda e: e["metrics"]["roc_auc"])  # fmt: skip
        verdict = "reached" if best["metrics"]["roc_auc"] >= target else "not reached"
        print(f"  best model: ROC-AUC {best['metrics']['roc_auc']:.3f}: target {target:.3f} {verdict}")


if __name__ == "__main__":
    main()

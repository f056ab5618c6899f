"""Deep model against the linear baseline on a cohort that can be failed (graded effect, label noise).

    python benchmarks/baseline.py                          # 40 participants, effect strength 0.5, 10% label noise
    python benchmarks/baseline.py --subjects 60 --effect-strength 1 --permutation-control
    python benchmarks/baseline.py --work W --skip-participant  # reuse W's preprocessed cohort

Prints figures; asserts nothing. Targets (issue 27): the default deep model is not worse than the linear baseline
(the paired difference's interval reaches above 0); the baseline adds <= 20% to the study's time; with
--permutation-control, both models' shuffled-target scores sit near chance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIN = Path(sys.executable).parent


def _run(*args: str) -> float:
    started = time.monotonic()
    subprocess.run([str(BIN / "bidsdl"), *args], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--effect-strength", type=float, default=0.5)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--skip-participant", action="store_true", help="reuse WORK's preprocessed cohort")
    parser.add_argument("--permutation-control", action="store_true")
    parser.add_argument("--group-args", nargs=argparse.REMAINDER, default=[], help="more group-level options")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl-baseline-"))
    bids, out = work / "bids", work / "derivatives"
    if not args.skip_participant:
        from pipeline.sample.generate import SampleOptions, write_sample_dataset

        write_sample_dataset(bids, SampleOptions(n_subjects=args.subjects, seed=args.seed, n_jobs=2,
                                                 effect_strength=args.effect_strength, label_noise=args.label_noise))
        seconds = _run(str(bids), str(out), "participant", "--nprocs", "2")
        print(f"participant level: {args.subjects} participants in {seconds:.0f} s")
    truth = json.loads((bids / "sourcedata" / "generation.json").read_text())["learning_truth"]
    extra = ["--permutation-control"] if args.permutation_control else []
    seconds = _run(str(bids), str(out), "group", "--target", "diagnosis", "--positive-class", "AD", *extra,
                   *args.group_args)
    results = json.loads(next((out / "learn" / "target-diagnosis").glob("arch-*/results.json")).read_text())
    linear, deep = results["baseline"], results["test"]
    metric = linear["headline"]

    def scored(evaluation: dict) -> str:
        low, high = evaluation.get("ci", {}).get(metric, (float("nan"), float("nan")))
        return f"{evaluation['metrics'][metric]:.3f} (95% CI {low:.3f}-{high:.3f})"

    print(f"cohort: effect strength {args.effect_strength}, label noise {args.label_noise}: best possible "
          f"{metric} {truth['best_possible_auc']:.3f}; test set {deep['n_subjects']} participants")
    print(f"deep ({results['architecture']}):  test {metric} {scored(deep)}")
    print(f"linear ({linear['model']}): test {metric} {scored(linear['test'])}")
    difference = linear["comparison"][metric]
    print(f"paired difference deep - linear: {difference['difference']:+.3f} (95% CI {difference['ci'][0]:+.3f} to "
          f"{difference['ci'][1]:+.3f}); deep higher in {difference['share_a_higher']:.0%} of resamples")
    print(f"verdict: {linear['verdict']['text']}")
    for name, comparison in linear["comparison"].items():
        print(f"  {name}: {comparison['difference']:+.3f} [{comparison['ci'][0]:+.3f}, {comparison['ci'][1]:+.3f}]")
    print(f"time: group level {seconds:.0f} s; study {results['wall_time_s']:.0f} s; baseline "
          f"{linear['wall_time_s']:.1f} s ({linear['wall_time_s'] / results['wall_time_s']:.1%} of the study; Gram "
          f"matrix {linear['gram_time_s']:.1f} s)")
    control = results.get("permutation_control")
    if control:
        print(f"permutation control: deep {scored(control['deep'])}; linear {scored(control['baseline'])}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()

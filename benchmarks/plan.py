"""How close --plan's predictions come to the jobs it plans.

Usage: python benchmarks/plan.py [--subjects 5] [--nprocs 2] [--bids DIR] [--epochs 10] [--keep DIR]

1. The participant level: `bidsdl ... participant --plan` on a generated 1 mm sample (or --bids DIR), timed (target:
   <= 3 min). Then the planned array task itself (the script's command: the plan's config, --participant-index I) for
   every participant, each watched the same way (peak resident memory of the whole process tree, wall time): the
   plan's figures (its heaviest participant) against each task's, and whether every task stays within the requests.
2. The group level: `group --plan` with the default design (nested below 300 participants) and --epochs N, then the
   planned single group job: predicted wall time and peak memory against the measured ones.
Target: predictions within 25% of the measured peak memory and wall time of the planned job. Prints figures;
asserts nothing.
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

from pipeline.plan import watch

BIDSDL = str(Path(sys.executable).parent / "bidsdl")


def _ratio(predicted: float, measured: float) -> str:
    return f"{predicted / measured:.2f}" if measured else "n/a"


def participant_level(bids: Path, out: Path, work: Path, nprocs: int) -> None:
    started = time.monotonic()
    subprocess.run([BIDSDL, str(bids), str(out), "participant", "--plan", "-w", str(work), "--nprocs", str(nprocs),
                    "-q"], check=True)  # fmt: skip
    plan_s = time.monotonic() - started
    plan = json.loads((out / "plan" / "participant.json").read_text())
    job = plan["jobs"][0]
    predicted = plan["usage"]
    print(f"participant --plan: {plan_s:.0f} s (target <= 180 s); measured {plan['measured_participant']} "
          f"({plan['chosen_because']}): peak {predicted['peak_rss_gb']:.2f} GB (PSS {predicted['peak_pss_gb']:.2f}), "
          f"wall {predicted['wall_s']:.0f} s; requests --mem={job['mem_gb']}G --time={job['time']}")
    labels = sorted(p.name for p in bids.glob("sub-*") if p.is_dir())  # --participant-index counts in this order
    print(f"{'task':>4} {'participant':>12} {'peak GB':>8} {'pred/meas':>9} {'wall s':>7} {'pred/meas':>9} "
          f"{'in requests':>11}")
    for index in range(plan["participants"]):
        log = work / f"task-{index}.log"
        usage = watch([BIDSDL, str(bids), str(out), "participant", "--config", str(out / "plan" /
                                                                                   "participant_config.json"),
                       "-w", str(work), "--participant-index", str(index), "--nprocs", str(nprocs),
                       "--omp-nthreads", str(nprocs), "--mem-gb", str(job["mem_gb"])], log_path=log)  # fmt: skip
        label = labels[index] if index < len(labels) else "?"
        inside = usage.peak_rss_gb <= job["mem_gb"] and usage.wall_s <= job["time_s"] and usage.exit_code == 0
        memory = _ratio(predicted["peak_rss_gb"], usage.peak_rss_gb)
        print(f"{index:>4} {label:>12} {usage.peak_rss_gb:>8.2f} {memory:>9} {usage.wall_s:>7.0f} "
              f"{_ratio(predicted['wall_s'], usage.wall_s):>9} {inside!s:>11}")


def group_level(bids: Path, out: Path, work: Path, nprocs: int, epochs: int) -> None:
    options = ["--target", "age", "--epochs", str(epochs), "--n-folds", "2",
               "--nprocs", str(nprocs), "-w", str(work), "-q"]  # fmt: skip
    started = time.monotonic()
    subprocess.run([BIDSDL, str(bids), str(out), "group", "--plan", *options], check=True)
    plan_s = time.monotonic() - started
    plan = json.loads((out / "plan" / "group.json").read_text())
    whole = next(j for j in plan["jobs"] if j["name"] == "group")
    usage = watch([BIDSDL, str(bids), str(out), "group", "--config", str(out / "plan" / "group_config.json"),
                   "-w", str(work), "--nprocs", str(nprocs), "--mem-gb", str(whole["mem_gb"])],
                  log_path=work / "group.log")  # fmt: skip
    print(f"group --plan: {plan_s:.0f} s; {plan['prediction']}")
    print(f"group job: predicted {plan['predicted_wall_s']:.0f} s, measured {usage.wall_s:.0f} s (ratio "
          f"{_ratio(plan['predicted_wall_s'], usage.wall_s)}); peak predicted {plan['usage']['peak_rss_gb']:.2f} GB, "
          f"measured {usage.peak_rss_gb:.2f} GB (ratio {_ratio(plan['usage']['peak_rss_gb'], usage.peak_rss_gb)}); "
          f"requests --mem={whole['mem_gb']}G --time={whole['time']}; exit {usage.exit_code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--bids", type=Path, help="a BIDS dataset instead of a generated sample")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bidsdl-plan-"))
    root.mkdir(parents=True, exist_ok=True)
    bids = args.bids or root / "bids"
    if args.bids is None and not (bids / "dataset_description.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "bidsdl-sample"), str(bids), "--subjects",
                        str(args.subjects), "--seed", "3"], check=True)  # fmt: skip
    out, work = root / "out", root / "work"
    participant_level(bids, out, work, args.nprocs)
    group_level(bids, out, work, args.nprocs, args.epochs)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The distribution check at inference: new people like the training cohort against images unlike it.

    python benchmarks/ood.py                      # 24 training participants, 12 new ones, one of each unfamiliar kind
    python benchmarks/ood.py --work W --skip-participant   # reuse W's preprocessed cohorts and trained model

Prints figures; asserts nothing. Targets (issue 28): every unfamiliar image (a FLAIR stored as T1w, an inverted
contrast, an infant's head, another scanner's contrast) flagged or refused; at most 1 in 6 new people like the
training cohort flagged; the check adds <= 1 s per image.
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
KINDS = ("flair", "inverted", "infant", "scanner")


def _run(*args: str, check: bool = True) -> float:
    started = time.monotonic()
    subprocess.run([str(BIN / "bidsdl"), *args], check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def _cohorts(work: Path, args: argparse.Namespace) -> Path:
    """Preprocess the training cohort, train the model, preprocess and predict the new cohort; the package."""
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    train, new = work / "bids", work / "new"
    write_sample_dataset(train, SampleOptions(n_subjects=args.subjects, seed=42, n_jobs=2))
    write_sample_dataset(new, SampleOptions(n_subjects=args.new_subjects, seed=7, label_prefix="ext", n_jobs=2,
                                            unfamiliar=KINDS))  # fmt: skip
    seconds = _run(str(train), str(work / "derivatives"), "participant", "--nprocs", "2")
    print(f"participant level, training cohort: {args.subjects} participants in {seconds:.0f} s")
    seconds = _run(str(train), str(work / "derivatives"), "group", "--target", "diagnosis", "--positive-class", "AD",
                   "--epochs", str(args.epochs))  # fmt: skip
    print(f"group level (training, {args.epochs} epochs): {seconds:.0f} s")
    package = sorted((work / "derivatives" / "models").iterdir())[-1]
    seconds = _run(str(new), str(work / "new_derivatives"), "participant", "--nprocs", "2", "--model", str(package),
                   check=False)  # fmt: skip
    print(f"participant level --model, new cohort: {args.new_subjects + len(KINDS)} participants in {seconds:.0f} s")
    _run(str(new), str(work / "new_derivatives"), "group", "--model", str(package))
    return package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--new-subjects", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--skip-participant", action="store_true", help="reuse WORK's cohorts and model")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bidsdl-ood-"))
    package = sorted((work / "derivatives" / "models").iterdir())[-1] if args.skip_participant else _cohorts(work, args)

    import nibabel as nib
    import numpy as np
    import pandas as pd

    from pipeline import derivatives
    from pipeline.learn import ood
    from pipeline.learn.ensemble import load_models
    from pipeline.learn.tasks.image.inference import infer

    out, new = work / "new_derivatives", work / "new"
    record = json.loads((package / "model.json").read_text())
    calibration = record["distribution"]["calibration"]
    print(f"model: {record['name']}, {len(record['weights'])} folds; threshold {calibration['threshold']:.2f} on "
          f"{calibration['n_validation']} validation images ({calibration['validation_flagged']:.0%} of them above)")
    kinds = json.loads((new / "sourcedata" / "generation.json").read_text())["unfamiliar"]
    table = pd.read_csv(out / "predictions.tsv", sep="\t")
    familiar = table[~table["participant_id"].isin(list(kinds))]
    flagged = familiar["out_of_distribution"].astype(str) == "True"
    print(f"new people like the cohort: {int(flagged.sum())} of {len(familiar)} images flagged "
          f"({flagged.mean():.0%}; target <= 1 in 6); scores {familiar['distribution_score'].min():.2f} to "
          f"{familiar['distribution_score'].max():.2f}")
    models = load_models([package])
    timings = []
    for participant, kind in kinds.items():
        t1w = next((new / participant).rglob("*_T1w.nii*")).relative_to(new)
        image = derivatives.named_path(out, t1w, "preproc_model", model_resolution=record["input"]["resolution_mm"])
        iqm = derivatives.named_path(out, t1w, "iqm")
        verdict = json.loads(iqm.read_text())["qc"]["verdict"]
        array = np.asarray(nib.load(image).dataobj, dtype=np.float32)
        result = infer(models, array)
        started = time.perf_counter()
        check = ood.check_image(models, result.features, iqm)
        timings.append(time.perf_counter() - started)
        row = table[table["participant_id"] == participant]
        written = f"predicted, flagged {row['out_of_distribution'].iloc[0]}" if len(row) else "refused (not predicted)"
        print(f"  {kind:9s} {participant}: quality control {verdict}; {written}; the check on its model-grid image: "
              f"{'flagged' if check['out_of_distribution'] else 'NOT flagged'} (score {check['score']:.2f}; "
              f"{len(check['metrics_outside'])} metric(s) outside)")
    print(f"the check itself (scores and metric ranges, features from the prediction's own pass): "
          f"{1000 * max(timings):.1f} ms per image at most")
    started = time.perf_counter()
    infer(models, array)
    print(f"a whole prediction with attribution maps, for scale: {time.perf_counter() - started:.2f} s per image")
    evaluation = json.loads((out / "external_evaluation.json").read_text())
    print(f"external evaluation: {evaluation['by_distribution']['text']}")


if __name__ == "__main__":
    main()

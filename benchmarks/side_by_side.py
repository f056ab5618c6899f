"""Side by side: the same group-level studies run by an earlier bidsdl (``--before REV``) and by this checkout, on one
generated sample preprocessed once, with the same seed; prints which outputs are identical and what differs.

The studies: classification, regression, search (two trials), segmentation of the structures, lesions (T1w + FLAIR),
transfer (each side's classification package as ``--init-from``, trained further on a second dataset of 8 other
participants: on the first, every validation participant would be one the source saw, which bidsdl now refuses),
and ood: each side's classification package predicts a new dataset with an unfamiliar image (``participant --model``,
then ``group --model``), and the prediction records (the distribution check's score and flag among them) and the
external evaluation are compared.

A refactor must leave every output as it was, except where a change meant to alter it (list those with
``--expected``). The earlier code runs from a git worktree of REV (``python -m pipeline.cli.run`` with that tree
first on ``PYTHONPATH``), this checkout's from its own tree; both use this environment's packages.

    python benchmarks/side_by_side.py --before 15e3e9b --out /tmp/side_by_side
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RUN = ("--n-folds", "2", "--epochs", "3", "--batch-size", "4", "--model-resolution", "4", "--test-size", "0.25",
       "--nprocs", "1", "--outer-folds", "0", "--seed", "42")  # fmt: skip
STUDIES: dict[str, tuple[str, ...]] = {
    "classification": ("--target", "diagnosis", "--positive-class", "AD", "--inputs", "T1w", *RUN),
    # stratified by sex: age's bins need more test participants than a cohort of 8 has
    "regression": ("--target", "age", "--task", "regression", "--inputs", "T1w", "--stratify", "sex", *RUN),
    "search": ("--target", "diagnosis", "--positive-class", "AD", "--inputs", "T1w", "--search", "2", *RUN),
    "segmentation": ("--task", "segmentation", "--labels", "{bids}/derivatives/labels", "--label-desc", "structures",
                     "--model-resolution", "3", "--patch-size", "32", "--n-folds", "1", "--epochs", "2",
                     "--outer-folds", "0", "--seed", "42", "--nprocs", "1"),
    "lesions": ("--task", "segmentation", "--labels", "{bids}/derivatives/lesions", "--label-desc", "lesion",
                "--inputs", "T1w", "FLAIR", "--model-resolution", "4", "--patch-size", "16", "--n-folds", "1",
                "--epochs", "2", "--test-size", "0.25", "--outer-folds", "0", "--seed", "42", "--nprocs", "1"),
    "transfer": ("--target", "diagnosis", "--positive-class", "AD", "--inputs", "T1w", "--init-from", "{source}", *RUN),
    "ood": ("--model", "{source}"),
}
#: The studies that start from each side's classification package (run after it).
FROM_SOURCE = ("transfer", "ood")


def _run(tree: Path, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.run", *args], env=env, cwd=tree,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{tree}: bidsdl {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def _tables(out: Path) -> dict[str, Path]:
    """Every TSV a study wrote under learn/ and models/ (predictions, case scores, splits, folds' histories)."""
    found = {}
    for base in ("learn", "models"):
        for path in sorted((out / base).rglob("*.tsv")) if (out / base).exists() else []:
            relative = path.relative_to(out)  # a package's folder is named by its content hash: keyed without it
            found[f"models/{'/'.join(relative.parts[2:])}" if base == "models" else str(relative)] = path
    return found


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _predictions(out: Path) -> dict[str, Any]:
    """The participant level's prediction records (keyed by their path) and the external evaluation, flattened."""
    found: dict[str, Any] = {}
    for path in sorted(out.glob("sub-*/**/*_prediction.json")):
        found.update(_flatten(json.loads(path.read_text()), str(path.relative_to(out))))
    external = out / "external_evaluation.json"
    if external.exists():
        found.update(_flatten(json.loads(external.read_text()), external.name))
    return found


def _results(out: Path) -> dict[str, Any]:
    paths = sorted((out / "learn").rglob("results.json"))
    if not paths:
        return {}
    results = json.loads(paths[0].read_text())
    for fold in results.get("folds") or []:  # the epochs' timings differ by nature
        for epoch in fold.get("history") or []:
            epoch.pop("epoch_time_s", None)
    return _flatten(results)


def _package(out: Path) -> dict[str, Any]:
    paths = sorted((out / "models").glob("*/model.json"))
    return _flatten(json.loads(paths[0].read_text())) if paths else {}


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included (an undefined metric is the same undefined metric)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def compare(before: Path, after: Path) -> dict[str, Any]:
    """What differs between two output folders of the same study."""
    tables_b, tables_a = _tables(before), _tables(after)
    for side, out in (("before", before), ("after", after)):  # group --model's gathered predictions
        if (out / "predictions.tsv").exists():
            (tables_b if side == "before" else tables_a)["predictions.tsv"] = out / "predictions.tsv"
    tables = {}
    for name in sorted(set(tables_b) | set(tables_a)):
        if name not in tables_b or name not in tables_a:
            tables[name] = "only " + ("after" if name in tables_a else "before")
            continue
        b, a = pd.read_csv(tables_b[name], sep="\t"), pd.read_csv(tables_a[name], sep="\t")
        if "epoch_time_s" in b:  # the histories' timings differ by nature
            b, a = b.drop(columns=["epoch_time_s"]), a.drop(columns=["epoch_time_s"], errors="ignore")
        tables[name] = "identical" if b.equals(a) else "differs"
    ignore = ("wall_time_s", "started", "finished", "bidsdl_version", "duration", "run_id", "environment", "host",
              "content_sha256", "package", "determinism", "hardware", "data.manifest_sha256", "model_dir", "path",
              "models.", "_time_s")  # fmt: skip
    fields = {}
    for name, (b, a) in {"results.json": (_results(before), _results(after)),
                         "model.json": (_package(before), _package(after)),
                         "predictions": (_predictions(before), _predictions(after))}.items():  # fmt: skip
        changed = sorted(k for k in set(b) | set(a)
                         if not _same(b.get(k), a.get(k)) and not any(i in k for i in ignore))  # fmt: skip
        fields[name] = changed
    return {"tables": tables, "fields": fields}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier revision (a commit of this repository)")
    parser.add_argument("--out", type=Path, required=True, help="a scratch folder (several hundred MB)")
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES),
                        help="transfer and ood need classification (run first, or kept in --out by --keep)")
    parser.add_argument("--keep", action="store_true", help="reuse --out's preprocessed sample (a second call)")
    args = parser.parse_args()
    out = args.out.resolve()
    bids, derivatives = out / "bids", out / "derivatives"
    keep = args.keep and (derivatives / "dataset_description.json").exists()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    before_tree = out / "before_tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before], check=True,
                   capture_output=True)  # fmt: skip
    # the installed package maps pipeline.templates to this checkout's templates/: the earlier tree gets its own
    if (before_tree / "templates").is_dir() and not (before_tree / "pipeline" / "templates").exists():
        (before_tree / "pipeline" / "templates").symlink_to(before_tree / "templates")
    try:
        if not keep:
            # 2 mm voxels: a FLAIR of 3 x 3 x 9 mm slices is too coarse to co-register reliably
            sample = ("--voxel-scale", "2", "--flair-fraction", "1", "--lesion-fraction", "1")
            subprocess.run([sys.executable, "-m", "pipeline.cli.sample", str(bids), "--subjects", "8", "--seed", "6",
                            *sample], check=True, cwd=ROOT)  # fmt: skip
            new = ("--subjects", "3", "--seed", "13", "--label-prefix", "ext", "--unfamiliar", "scanner")
            subprocess.run([sys.executable, "-m", "pipeline.cli.sample", str(out / "new"), *new, *sample], check=True,
                           cwd=ROOT)  # fmt: skip
            seconds = _run(ROOT, str(bids), str(derivatives), "participant", "--nprocs", "2", "--model-resolution",
                           "4", "--registration", "affine")  # fmt: skip
            print(f"participant level (this checkout, shared by both): {seconds:.0f} s")
        second = out / "second"
        if "transfer" in args.studies and not (second / "derivatives" / "dataset_description.json").exists():
            shutil.rmtree(second, ignore_errors=True)
            options = ("--subjects", "8", "--seed", "7", "--label-prefix", "tr", "--voxel-scale", "2")
            subprocess.run([sys.executable, "-m", "pipeline.cli.sample", str(second / "bids"), *options], check=True,
                           cwd=ROOT)  # fmt: skip
            _run(ROOT, str(second / "bids"), str(second / "derivatives"), "participant", "--nprocs", "2",
                 "--model-resolution", "4", "--registration", "affine")  # fmt: skip
        report = {}
        for study in args.studies:
            runs = {}
            for side, tree in (("before", before_tree), ("after", ROOT)):
                source = next(iter(sorted((out / f"classification_{side}" / "models").glob("*/model.json"))), None)
                if study in FROM_SOURCE and source is None:
                    raise SystemExit(f"{study} starts from the classification package: run classification first")
                options = [o.format(bids=bids, source=source.parent if source else "") for o in STUDIES[study]]
                target, work = out / f"{study}_{side}", out / f"work_{study}_{side}"
                shutil.rmtree(target, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
                if study == "ood":  # the new dataset's participant level with the model, then its evaluation
                    started = time.monotonic()
                    _run(tree, str(out / "new"), str(target), "participant", "--nprocs", "2", "--registration",
                         "affine", "--model-resolution", "4", "-w", str(work), *options)  # fmt: skip
                    _run(tree, str(out / "new"), str(target), "group", *options)
                    runs[side] = time.monotonic() - started
                    continue
                dataset = second if study == "transfer" else out
                shutil.copytree(dataset / "derivatives", target, ignore=shutil.ignore_patterns(".bidsdl_work"))
                runs[side] = _run(tree, str(dataset / "bids"), str(target), "group", "-w", str(work), *options)
            report[study] = compare(out / f"{study}_before", out / f"{study}_after")
            same = [t for t, v in report[study]["tables"].items() if v == "identical"]
            other = {t: v for t, v in report[study]["tables"].items() if v != "identical"}
            print(f"\n{study}: {runs['before']:.0f} s before, {runs['after']:.0f} s after")
            print(f"  tables identical ({len(same)}): {', '.join(same)}")
            print(f"  tables that differ: {other or 'none'}")
            for name, changed in report[study]["fields"].items():
                print(f"  {name} fields that differ ({len(changed)}): {', '.join(changed) or 'none'}")
        (out / "side_by_side.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten: {out / 'side_by_side.json'}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], check=False,
                       capture_output=True)  # fmt: skip


if __name__ == "__main__":
    main()

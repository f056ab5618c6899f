"""Training benchmark: data-pipeline cost, epoch time, peak RSS and the whole group level's wall time.

    python benchmarks/train.py                       # throughput on generated 2 mm-grid arrays
    python benchmarks/train.py --bids B --out O      # + the default group level on a preprocessed dataset
    python benchmarks/train.py --bids B --out O --permuted   # + the negative control (labels permuted)

Prints figures; asserts nothing (targets: data pipeline <= 10% of training time; 5-fold default on
the 40-subject sample <= 10 min; test ROC-AUC >= 0.9; permuted labels: AUC within 0.5 +- 0.15).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learn.models import ModelConfig, build_model
from pipeline.learn.train import Volumes, batches, precision_for

SHAPE = (77, 95, 82)  # the 2 mm model grid of the bundled template


def throughput(n: int = 32, batch_size: int = 8, amp: bool = False) -> dict[str, float]:
    """Volumes/s training from memory-mapped .npy files vs the same batches already in memory."""
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.npy")
        np.save(paths[-1], rng.normal(size=(1, *SHAPE)).astype(np.float32))
    data = Volumes(paths, np.arange(n) % 2)
    device = torch.device("cpu")
    precision = precision_for(device, amp)
    model = build_model(ModelConfig("conv5fc3", 2, SHAPE))
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters())
    in_memory = [data.batch(chunk) for chunk in batches(np.arange(n), batch_size)]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with precision.autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(*in_memory[0])  # warm-up
    start = time.perf_counter()
    for x, y in in_memory:
        step(x, y)
    memory_s = time.perf_counter() - start
    start = time.perf_counter()
    for chunk in batches(np.arange(n), batch_size):
        step(*data.batch(chunk))
    pipeline_s = time.perf_counter() - start
    shutil.rmtree(folder)
    return {"in_memory_vol_s": n / memory_s, "pipeline_vol_s": n / pipeline_s, "overhead": pipeline_s / memory_s - 1}


def group_level(bids: Path, out: Path, extra: list[str]) -> dict[str, object]:
    start = time.perf_counter()
    command = ["bidsdl", str(bids), str(out), "group", "--target", "diagnosis", "--positive-class", "AD", *extra]
    code = subprocess.run(command, check=False).returncode
    wall = time.perf_counter() - start
    results = sorted(out.glob("learn/target-diagnosis/arch-*/results.json"))
    test = json.loads(results[-1].read_text())["test"] if results and code == 0 else {}
    metrics = test.get("metrics", {})
    return {
        "exit": code,
        "wall_s": round(wall, 1),
        "test_roc_auc": metrics.get("roc_auc"),
        "test_balanced_accuracy": metrics.get("balanced_accuracy"),
        "ci_roc_auc": test.get("ci", {}).get("roc_auc"),
    }


def permuted_copy(bids: Path, folder: Path, seed: int = 0) -> Path:
    """The dataset with its diagnosis column permuted (images linked, not copied)."""
    copy = folder / "bids_permuted"
    shutil.copytree(bids, copy, symlinks=True, copy_function=lambda s, d: Path(d).symlink_to(Path(s).resolve()))
    table = pd.read_csv(bids / "participants.tsv", sep="\t")
    table["diagnosis"] = np.random.default_rng(seed).permutation(table["diagnosis"].to_numpy())
    (copy / "participants.tsv").unlink()
    table.to_csv(copy / "participants.tsv", sep="\t", index=False)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bids", type=Path)
    parser.add_argument("--out", type=Path, help="participant-level derivatives of --bids")
    parser.add_argument("--permuted", action="store_true", help="also run the negative control")
    parser.add_argument("--amp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    figures = throughput(amp=args.amp)
    print(f"training from memory:          {figures['in_memory_vol_s']:.1f} volumes/s")
    print(f"training from memory-mapped:   {figures['pipeline_vol_s']:.1f} volumes/s "
          f"(data pipeline overhead {100 * figures['overhead']:+.1f}%)")  # fmt: skip
    if args.bids and args.out:
        result = group_level(args.bids, args.out, [])
        print(f"group level (defaults): {result}")
        if args.permuted:
            with tempfile.TemporaryDirectory() as tmp:
                copy = permuted_copy(args.bids, Path(tmp))
                out = Path(tmp) / "out"
                shutil.copytree(args.out, out, ignore=shutil.ignore_patterns("learn", "models", "*.html"))
                print(f"negative control (permuted): {group_level(copy, out, ['--skip-bids-validation'])}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: this process {rss:.0f} MB, group-level process {children:.0f} MB")


if __name__ == "__main__":
    main()

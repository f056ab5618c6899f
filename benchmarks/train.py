"""Training benchmark: the data pipeline against the model, DDP over gloo, precision, fold-parallel SLURM jobs.

    python benchmarks/train.py                       # throughput, loader, DDP, precision (generated arrays)
    python benchmarks/train.py --slurm               # + fold-parallel vs sequential on the SLURM here
    python benchmarks/train.py --bids B --out O      # + the default group level on a preprocessed dataset
    python benchmarks/train.py --bids B --out O --permuted   # + the negative control (labels permuted)

Prints figures; asserts nothing. Targets: the data pipeline costs <= 10% of training time at the model's
own rate; the loader alone outruns a modern GPU on the default model; 2 gloo processes give the results
of one within the stated tolerance (communication overhead per step reported: 2 cores give no speed-up);
the default training path >= 2x a plain fp32 baseline where the hardware allows; 5-fold default on the
40-subject sample <= 10 min, test ROC-AUC >= 0.9, permuted labels: AUC within 0.5 +- 0.15.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learn.device import precision_for, prefetch
from pipeline.learn.distributed import SINGLE
from pipeline.learn.models import ModelConfig, build_model
from pipeline.learn.tasks.segmentation import SegmentationData, model_grid
from pipeline.learn.train import TrainSettings, Volumes, _epoch_batches

CLASSIFIER_GRID = (77, 95, 82)  # the 2 mm model grid of the bundled template
#: Assumed training rates of one modern GPU (H100/H200 class, bf16) on the default models; no GPU was lent to
#: measure them. Why: the default classifier's step is tiny (3.2 GFLOP per volume; ~40 MB of activations), so
#: at batch 8 a GPU is bound by kernel launches (~100 kernels per step, ~1 ms) and by the host-to-device copy
#: of 2.4 MB per volume, not by its arithmetic: ~5,000 volumes/s. The UNet's 64^3 patch step (8.3 GFLOP,
#: ~120 MB of activations) is bound by memory traffic and 3D-convolution efficiency: ~1,500 patches/s.
ASSUMED_GPU_RATE = {"classification": 5000.0, "segmentation": 1500.0}


def _arrays(folder: Path, n: int, shape: tuple[int, ...], *, labels: int = 0) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images, masks = [], []
    for i in range(n):
        images.append(folder / f"{i}.npy")
        np.save(images[-1], rng.normal(size=(1, *shape)).astype(np.float32))
        if labels:
            masks.append(folder / f"{i}_dseg.npy")
            mask = np.zeros(shape, np.uint8)
            for k in range(1, labels + 1):  # small boxes as structures
                c = rng.integers(20, np.array(shape) - 20)
                mask[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 4 : c[2] + 4] = k
            np.save(masks[-1], mask)
    return images, masks


def _task(kind: str, folder: Path) -> dict[str, Any]:
    """The default model of a task, its data as the training loop reads it, and its settings."""
    if kind == "classification":
        images, _ = _arrays(folder, 24, CLASSIFIER_GRID)
        data: Any = Volumes(images, np.arange(24) % 2)
        config = ModelConfig("conv5fc3", 2, CLASSIFIER_GRID)
        settings = TrainSettings(n_outputs=2, batch_size=8)

        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(out.float(), y.long())

    else:
        shape = model_grid(1.5)[1]
        images, masks = _arrays(folder, 8, shape, labels=6)
        data = SegmentationData(images, masks, patch_size=64, n_classes=7)
        config = ModelConfig("unet", 7, (64, 64, 64))
        settings = TrainSettings(n_outputs=7, batch_size=2)

        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(out.float(), y[:, 0])

    name = f"{kind} ({config.architecture})"
    return {"data": data, "config": config, "settings": settings, "loss": loss, "name": name}


def _model_and_step(task: dict[str, Any], amp: bool | None):
    device = torch.device("cpu")
    precision = precision_for(device, amp)
    torch.manual_seed(0)
    model = build_model(task["config"])
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with precision.autocast(device):
            loss = task["loss"](model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    return model, step


def throughput(task: dict[str, Any], *, steps: int = 6, rounds: int = 3, amp: bool | None = None) -> dict[str, float]:
    """Volumes/s: model steps on batches already in memory; the full pipeline (loader, prefetch thread, step);
    the loader alone with 1 and 2 threads. Rounds alternate and the medians are reported (a 2-core VM is noisy);
    a first pass warms the caches (memory maps, each image's foreground voxels)."""
    settings, data = task["settings"], task["data"]
    order = np.resize(np.arange(len(data)), settings.batch_size * steps)
    cpu = torch.device("cpu")
    _, step = _model_and_step(task, amp)
    in_memory = [make()[2:] for make in _epoch_batches(data, order, settings, 0, SINGLE, cpu)]
    step(*in_memory[0])  # warm-up
    times: dict[str, list[float]] = {"model": [], "pipeline": [], "loader_1": [], "loader_2": []}
    for r in range(rounds):
        start = time.perf_counter()
        for x, y in in_memory:
            step(x, y)
        times["model"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for _, _, x, y in prefetch(_epoch_batches(data, order, settings, 1 + r, SINGLE, cpu)):
            step(x, y)
        times["pipeline"].append(time.perf_counter() - start)
        for threads in (1, 2):
            start = time.perf_counter()
            for _item in prefetch(_epoch_batches(data, order, settings, 10 + r, SINGLE, cpu), threads):
                pass
            times[f"loader_{threads}"].append(time.perf_counter() - start)
    median = {k: float(np.median(v)) for k, v in times.items()}
    n = len(order)
    return {"model_vol_s": n / median["model"], "pipeline_vol_s": n / median["pipeline"],
            "loader_vol_s": n / median["loader_1"], "loader_2_vol_s": n / median["loader_2"],
            "overhead": median["pipeline"] / median["model"] - 1}  # fmt: skip


def step_flops(task: dict[str, Any]) -> float:
    """FLOPs of one training step per volume (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(task["config"])
    x = torch.zeros(1, 1, *task["config"].in_shape)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return float(counter.get_total_flops())


def precision_figures(task: dict[str, Any], steps: int = 4) -> dict[str, Any]:
    """The default training path against plain fp32 (and bf16 opted in on this CPU), and whether bf16 is
    bit-for-bit reproducible here (two runs of the same steps compared)."""
    settings, data = task["settings"], task["data"]
    order = np.resize(np.arange(len(data)), settings.batch_size * steps)
    batches = [make()[2:] for make in _epoch_batches(data, order, settings, 0, SINGLE, torch.device("cpu"))]
    out: dict[str, Any] = {}
    for name, amp in (("fp32", False), ("default", None), ("bf16", True)):
        weights = []
        for _ in range(2):
            model, step = _model_and_step(task, amp)
            step(*batches[0])
            start = time.perf_counter()
            for x, y in batches[1:]:
                step(x, y)
            out[f"{name}_vol_s"] = (len(batches) - 1) * settings.batch_size / (time.perf_counter() - start)
            weights.append(torch.cat([p.detach().flatten().float() for p in model.parameters()]))
        out[f"{name}_reproducible"] = bool(torch.equal(weights[0], weights[1]))
    out["default_precision"] = precision_for(torch.device("cpu"), None).name
    return out


# --- DDP: 1 vs 2 gloo processes -----------------------------------------------------------------------------
def _ddp_worker(rank: int, size: int, port: int, folder: str, steps: int, threads: int) -> None:
    import torch.distributed as dist

    from pipeline.learn import distributed
    from pipeline.learn.distributed import World

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    world = World(rank, size, rank, "benchmark")
    distributed.start(world, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(ModelConfig("conv5fc3", 2, CLASSIFIER_GRID))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters())
    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.normal(size=(8, 1, *CLASSIFIER_GRID)).astype(np.float32)),
                torch.from_numpy(np.arange(8) % 2)) for _ in range(steps + 1)]  # fmt: skip
    timings = []
    for x, y in batches:
        start = time.perf_counter()
        mine = distributed.share(np.arange(8), world)
        loss = torch.nn.functional.cross_entropy(ddp(x[mine]), y[mine]) * (len(mine) * size / 8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    grads = torch.zeros(sum(p.numel() for p in model.parameters()))
    dist.barrier()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(grads)
    allreduce = (time.perf_counter() - start) / 20
    if rank == 0:
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"step_s": float(np.mean(timings[1:])), "allreduce_s": allreduce, "weights": weights},
                   Path(folder) / "ddp.pt")  # fmt: skip
    distributed.stop()


def _single(steps: int, threads: int) -> tuple[float, torch.Tensor]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig("conv5fc3", 2, CLASSIFIER_GRID))
    optimizer = torch.optim.AdamW(model.parameters())
    rng = np.random.default_rng(0)
    timings = []
    for _ in range(steps + 1):
        x = torch.from_numpy(rng.normal(size=(8, 1, *CLASSIFIER_GRID)).astype(np.float32))
        y = torch.from_numpy(np.arange(8) % 2)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return float(np.mean(timings[1:])), torch.cat([p.detach().flatten() for p in model.parameters()])


def ddp_figures(steps: int = 8) -> dict[str, float]:
    """The default model, batches of 8: one process (2 threads, 1 thread) against 2 gloo processes (1 thread each)."""
    import torch.multiprocessing as mp

    folder = Path(tempfile.mkdtemp())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    processes = [context.Process(target=_ddp_worker, args=(r, 2, port, str(folder), steps, 1)) for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    two = torch.load(folder / "ddp.pt")
    one_2t, _ = _single(steps, 2)
    one_1t, weights = _single(steps, 1)
    torch.set_num_threads(2)
    shutil.rmtree(folder)
    return {
        "one_process_2_threads_step_s": one_2t,
        "one_process_1_thread_step_s": one_1t,
        "two_processes_step_s": two["step_s"],
        "allreduce_ms": 1000 * two["allreduce_s"],
        "max_weight_difference": float((two["weights"] - weights).abs().max()),
        "n_parameters": int(weights.numel()),
    }


# --- fold-parallel vs sequential on SLURM -------------------------------------------------------------------
def _wait(job: str) -> None:
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(1)


def slurm_folds(folder: Path, n_folds: int = 2, epochs: int = 200) -> dict[str, float]:
    """Wall time, submission to the package, of the same group level as one job (folds in turn, all CPUs) and as
    a fold array of 1-CPU tasks + the assembly (submit_group.sh)."""
    from pipeline.cli.run import main as bidsdl
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    root = Path(__file__).resolve().parents[1]
    bids, derivatives = folder / "bids", folder / "derivatives"
    write_sample_dataset(bids, SampleOptions(n_subjects=10, seed=6, voxel_scale=3, n_jobs=2))
    assert bidsdl([str(bids), str(derivatives), "participant", "--nprocs", "2"]) == 0
    args = ["--target", "diagnosis", "--positive-class", "AD", "--epochs", str(epochs), "--patience", "1000",
            "--test-size", "0.2"]  # fmt: skip
    executable = str(Path(sys.executable).parent / "bidsdl")
    figures = {}
    for name in ("sequential", "fold_parallel"):
        out = folder / name
        shutil.copytree(derivatives, out, ignore=shutil.ignore_patterns(".bidsdl_work"))
        (out / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "BIDS_DIR": str(bids), "OUTPUT_DIR": str(out), "BIDSDL": executable}
        start = time.perf_counter()
        if name == "sequential":
            env["BIDSDL_ARGS"] = " ".join([*args, "--n-folds", str(n_folds)])
            job = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", "--mem=6G", f"--output={out}/job.log",
                                  str(root / "scripts" / "slurm" / "group.sbatch")], env=env, capture_output=True,
                                 text=True, check=True).stdout.strip()  # fmt: skip
            _wait(job)
        else:
            env.update(GROUP_ARGS=" ".join(args), N_FOLDS=str(n_folds))
            submit = ["bash", str(root / "scripts" / "slurm" / "submit_group.sh"), "--cpus-per-task=1", "--mem=3G"]
            ids = subprocess.run(submit, env=env, capture_output=True, text=True, check=True).stdout.split()
            for job in ids:
                _wait(job)
        figures[f"{name}_s"] = time.perf_counter() - start
        figures[f"{name}_package"] = bool(list((out / "models").glob("diagnosis_*")))
    return figures


# --- the whole group level ----------------------------------------------------------------------------------
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
    parser.add_argument("--slurm", action="store_true", help="also time fold-parallel vs sequential on SLURM")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("classification", "segmentation"):
            task = _task(kind, Path(tmp) / kind)
            figures = throughput(task)
            flops, gpu = step_flops(task), ASSUMED_GPU_RATE[kind]
            print(f"{task['name']}, batch {task['settings'].batch_size}, {task['config'].in_shape}:")
            print(f"  model steps alone:           {figures['model_vol_s']:7.1f} volumes/s")
            print(f"  full pipeline (prefetched):  {figures['pipeline_vol_s']:7.1f} volumes/s "
                  f"(data pipeline {100 * figures['overhead']:+.1f}% of the model's time)")  # fmt: skip
            print(f"  loader alone:                {figures['loader_vol_s']:7.1f} volumes/s (1 thread), "
                  f"{figures['loader_2_vol_s']:.1f} (2 threads); assumed GPU rate {gpu:.0f} volumes/s "
                  f"({flops / 1e9:.1f} GFLOP per volume and step)")  # fmt: skip
            p = precision_figures(task)
            print(f"  precision: default ({p['default_precision']} here) {p['default_vol_s']:.1f}, plain fp32 "
                  f"{p['fp32_vol_s']:.1f} ({p['default_vol_s'] / p['fp32_vol_s']:.2f}x), bf16 opted in "
                  f"{p['bf16_vol_s']:.1f} volumes/s ({p['bf16_vol_s'] / p['fp32_vol_s']:.2f}x); bit-for-bit "
                  f"reproducible: fp32 {p['fp32_reproducible']}, bf16 {p['bf16_reproducible']}")  # fmt: skip
    d = ddp_figures()
    print(f"DDP, conv5fc3, batch 8 ({d['n_parameters']} parameters): one process "
          f"{d['one_process_2_threads_step_s']:.3f} s/step (2 threads), {d['one_process_1_thread_step_s']:.3f} "
          "s/step (1 thread); 2 gloo processes "
          f"(1 thread each) {d['two_processes_step_s']:.3f} s/step; gradient all-reduce {d['allreduce_ms']:.1f} ms "
          f"per step; weights after 8 steps differ from one process's by at most {d['max_weight_difference']:.2e} "
          "(batch norm on each process's share)")  # fmt: skip
    if args.slurm:
        with tempfile.TemporaryDirectory() as tmp:
            s = slurm_folds(Path(tmp))
            print(f"SLURM, 2 folds x 200 epochs at 2 mm: one job (folds in turn, 2 CPUs) {s['sequential_s']:.0f} s; "
                  f"fold array (2 x 1 CPU) + assembly {s['fold_parallel_s']:.0f} s; "
                  f"packages: {s['sequential_package']}, "
                  f"{s['fold_parallel_package']}")  # fmt: skip
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
    print(f"peak RSS: this process {rss:.0f} MB, child processes {children:.0f} MB")


if __name__ == "__main__":
    main()

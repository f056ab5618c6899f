"""Distributed data parallel: who a process is, how a batch is shared, and 2 gloo processes = 1 process.

The multi-process tests start real processes (``torch.multiprocessing``) that form a real gloo process
group on this machine.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from pipeline.errors import InputDataError, UsageError
from pipeline.learn import distributed
from pipeline.learn.distributed import World, detect, first_host
from pipeline.learn.registry import get_task
from pipeline.learn.train import TrainSettings, Volumes, _check_world, fit, load_checkpoint

SHAPE = (8, 8, 8)


def test_the_launcher_is_read_from_its_variables():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert detect(torchrun) == World(3, 4, 1, "torchrun")  # torchrun inside an srun step wins
    assert detect({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1"}) == World(1, 2, 1, "srun")
    # a batch script without srun is one process, whatever --ntasks said
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == distributed.SINGLE
    assert detect({}).main and not detect({}).active
    assert first_host("gpu[07-09,12]") == "gpu07" and first_host("n1,n2") == "n1"


@pytest.mark.parametrize(("n", "size"), [(8, 2), (5, 2), (7, 3), (3, 3)])
def test_every_item_of_a_batch_goes_to_exactly_one_rank(n, size):
    chunk = np.arange(100, 100 + n)
    parts = [distributed.share(chunk, World(rank, size)) for rank in range(size)]
    assert np.array_equal(np.concatenate(parts), chunk)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_impossible_worlds_are_refused_with_a_way_out():
    with pytest.raises(UsageError, match="4 processes but only 3 training image"):
        _check_world(World(0, 4), 3, 8)
    with pytest.raises(UsageError, match="--batch-size 2 is the batch of one optimiser step across all 4 processes"):
        _check_world(World(0, 4), 30, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_a_gpu_asked_for_and_absent_is_an_error_not_a_cpu_run():
    with pytest.raises(UsageError, match="nothing falls back to the CPU silently"):
        distributed.device_for(World(1, 2, 1, "torchrun"), "cuda")
    assert distributed.device_for(World(1, 2, 1, "torchrun"), "auto").type == "cpu"


# --- real process groups ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _volumes(folder: Path, n: int, seed: int) -> Volumes:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"v{i}.npy")
        np.save(paths[-1], rng.normal(size=(1, *SHAPE)).astype(np.float32))
    return Volumes(paths, rng.normal(size=n).astype(np.float32))


def _plain_model() -> torch.nn.Module:
    """No batch norm and no dropout: what N processes learn must then equal what one learns."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 27, 1)
    )


REGRESSION = get_task("regression")
SETTINGS = TrainSettings(
    n_outputs=1, epochs=3, batch_size=5, lr=1e-2, patience=10, seed=3, amp=False
)  # fp32: bf16 rounds a batch and its shares differently


def _fit_rank(rank: int, size: int, port: int, folder: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.start(World(rank, size, rank, "test"), torch.device("cpu"))
    try:
        train, val = _volumes(Path(folder) / "train", 11, 0), _volumes(Path(folder) / "val", 4, 1)
        run_dir = Path(folder) / ("ddp" if rank == 0 else "never-written")
        fit(
            _plain_model(),
            train,
            val if rank == 0 else None,
            SETTINGS,
            task=REGRESSION,
            run_dir=run_dir,
            device=torch.device("cpu"),
        )
    finally:
        distributed.stop()


def _in_processes(target, size: int, *args) -> None:
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, size, port, *args)) for rank in range(size)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * size


def test_two_gloo_processes_learn_what_one_process_learns(tmp_path):
    """The gradients of each rank's share, weighted by its size and averaged, are the batch's gradient."""
    torch.set_num_threads(1)
    train, val = _volumes(tmp_path / "train", 11, 0), _volumes(tmp_path / "val", 4, 1)
    single = fit(
        _plain_model(), train, val, SETTINGS, task=REGRESSION, run_dir=tmp_path / "single", device=torch.device("cpu")
    )
    _in_processes(_fit_rank, 2, str(tmp_path))
    assert not (tmp_path / "never-written").exists()  # rank 1 wrote nothing
    one = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, atol=1e-5, rtol=1e-4)
    history = [row["train_loss"] for row in single.history]
    assert np.allclose([row["train_loss"] for row in two["history"]], history, rtol=1e-4)
    best = load_file(str(tmp_path / "ddp" / "best-loss.safetensors"))
    assert set(best) == set(one["model"])


def _check_rank(rank: int, size: int, port: int, folder: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.start(World(rank, size, rank, "test"), torch.device("cpu"))
    try:
        with pytest.raises(UsageError, match=r"Rank 1 .* other settings than rank 0 \(lr: 0.001 on rank 0, 0.01 on"):
            distributed.check_same_settings({"lr": 0.001 if rank == 0 else 0.01, "epochs": 3}, World(rank, size))
        own = Path(folder) / f"rank{rank}.npy"  # the "same" cached array, with other contents on each node
        np.save(own, np.full(3, rank, np.float32))
        with pytest.raises(InputDataError, match="do not see the same training data: rank\\(s\\) 1"):
            distributed.check_same_start([own], 0, World(rank, size))
        same = Path(folder) / "shared.npy"
        if rank == 0:
            np.save(same, np.zeros(3, np.float32))
        torch.distributed.barrier()
        with pytest.raises(InputDataError, match="resume from different epochs"):
            distributed.check_same_start([same], 4 if rank == 0 else 0, World(rank, size))
        distributed.check_same_start([same], 2, World(rank, size))  # the same files from the same epoch: fine
    finally:
        distributed.stop()


def test_ranks_started_differently_are_refused_on_every_rank(tmp_path):
    _in_processes(_check_rank, 2, str(tmp_path))


# --- memory pre-flight --------------------------------------------------------------------------------------
def test_the_memory_estimate_of_the_default_model_and_a_refusal_that_names_a_batch_size():
    from pipeline.learn.memory import GB, check_fits, footprint
    from pipeline.learn.models import ModelConfig, build_model

    model = build_model(ModelConfig("conv5fc3", 2, (77, 95, 82)))
    estimate = footprint(model, (77, 95, 82))
    assert 20e6 < estimate.per_item < 80e6 and estimate.fixed < 20e6  # measured: ~40 MB per volume at 2 mm
    cpu = torch.device("cpu")
    assert check_fits(estimate, batch_size=8, world_size=1, available=8 * GB, device=cpu, what="x") < 1 * GB
    refused = r"with --batch-size 64 \(32 per process\) needs about .* --batch-size 10 fits"
    with pytest.raises(UsageError, match=refused):
        check_fits(estimate, batch_size=64, world_size=2, available=0.25 * GB, device=cpu, what="conv5fc3")
    with pytest.raises(UsageError, match="not even a batch of 2 fits: use a smaller --patch-size"):
        check_fits(estimate, batch_size=8, world_size=1, available=0.05 * GB, device=cpu, what="conv5fc3")


def test_a_compiled_training_step_learns_what_the_plain_one_learns(tmp_path):
    import dataclasses

    train, val = _volumes(tmp_path / "train", 6, 0), _volumes(tmp_path / "val", 2, 1)
    weights = []
    for compiled in (False, True):
        model = _plain_model()
        settings = dataclasses.replace(SETTINGS, epochs=1, compile=compiled)
        fit(model, train, val, settings, task=REGRESSION, run_dir=tmp_path / str(compiled), device=torch.device("cpu"))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], atol=1e-5, rtol=1e-4)

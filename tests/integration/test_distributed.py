"""The group level under ``torchrun``: 2 processes, gloo on CPU, the learning sample, short training.

Stated tolerance (CPU): the package of 2 processes predicts within 0.05 (probability) of the
single-process package after this short training; the difference comes from batch norm computed on
each process's share of the batch (torch synchronises it on GPUs only) and from per-rank dropout.
Without batch norm and dropout the two are equal to 1e-5 (``tests/unit/test_distributed.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.learn.train import load_checkpoint
from tests.helpers import FAST, fresh_output, the_package

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
TOLERANCE = 0.05


def torchrun(bids: Path, out: Path, *args: str, n: int = 2, wait: bool = True) -> subprocess.Popen | tuple[int, str]:
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(n), "--no-python", str(BIN / "bidsdl"),
               str(bids), str(out), "group", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if not wait:
        return job
    output, _ = job.communicate(timeout=600)
    return job.returncode, output


def _files(out: Path) -> set[str]:
    """What the group level wrote (its training runs and the package; logs have run ids)."""
    return {str(p.relative_to(out)) for part in ("learn", "models") for p in (out / part).rglob("*")
            if p.is_file() and "logs" not in p.parts}  # fmt: skip


@pytest.mark.slow  # two torchrun processes train end to end: ~1 min each
def test_two_processes_train_one_model_rank_0_writes(learning_sample, trained_package, tmp_path):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "ddp")
    code, output = torchrun(bids, out, *FAST)
    assert code == 0, output
    assert "[rank 1] INFO: Rank 1 of 2: trained 2 fold(s) with rank 0; wrote nothing" in output
    package = the_package(out)
    environment = json.loads((package / "environment.json").read_text())
    assert environment["distributed"] == {"world_size": 2, "launcher": "torchrun", "backend": "gloo"}
    # the same outputs as a single process (nothing more: rank 1 wrote nothing), predictions within tolerance
    single = trained_package.parent.parent
    assert {f.replace(package.name, "P") for f in _files(out)} == {
        f.replace(trained_package.name, "P") for f in _files(single)
    }
    ours = pd.read_csv(package / "predictions.tsv", sep="\t")
    theirs = pd.read_csv(trained_package / "predictions.tsv", sep="\t")
    assert (ours["source"] == theirs["source"]).all()
    assert (ours["probability"] - theirs["probability"]).abs().max() <= TOLERANCE

    # the same command again: the same package, bit for bit (reproducible for N = 2)
    again = fresh_output(derivatives, tmp_path / "again")
    assert torchrun(bids, again, *FAST)[0] == 0
    for weights in package.glob("fold-*.safetensors"):
        assert weights.read_bytes() == (the_package(again) / weights.name).read_bytes()

    # --resume under torchrun: finished folds are not trained again
    checkpoint = out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "fold-1" / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    code, output = torchrun(bids, out, *FAST, "--resume")
    assert code == 0 and checkpoint.stat().st_mtime_ns == stamp, output

    # a checkpoint of 2 processes is not continued by 1 (each one's share of the batches would change)
    state = load_checkpoint(checkpoint)
    torch.save({**state, "finished": False, "epoch": 0, "history": state["history"][:1]}, checkpoint)
    result = subprocess.run([str(BIN / "bidsdl"), str(bids), str(out), "group", *FAST, "--resume"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 65, result.stderr
    assert "was written by a run of 2 process(es); this run has 1" in result.stderr
    code, output = torchrun(bids, out, *FAST, "--resume")  # with 2 again: it continues
    assert code == 0, output
    assert "fold 2/2 resuming after epoch 1" in output


def test_a_rank_that_dies_ends_the_run_promptly(learning_sample, tmp_path):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    job = torchrun(bids, out, *FAST, "--epochs", "500", "--patience", "1000", wait=False)
    history = out / "learn" / "target-diagnosis" / "arch-conv5fc3" / "fold-0" / "history.tsv"
    deadline = time.monotonic() + 300
    while not history.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert history.exists(), "training did not start"
    ranks = subprocess.run(["pgrep", "-f", f"bidsdl {bids} {out}"], capture_output=True, text=True).stdout.split()
    os.kill(int(max(ranks, key=int)), signal.SIGKILL)  # the younger process: rank 1
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60, "the other rank lingered"
    assert "exitcode  : -9" in output  # torchrun's summary names the rank that died
    assert not subprocess.run(["pgrep", "-f", f"bidsdl {bids} {out}"], capture_output=True).stdout


def test_a_rank_0_error_stops_the_other_ranks_with_its_message(learning_sample, tmp_path):
    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    args = [*FAST]
    args[args.index("diagnosis")] = "handedness"
    code, output = torchrun(bids, out, *args)
    assert code != 0
    assert "Columns found: age, diagnosis, sex, site." in output
    assert "[rank 1] ERROR: Rank 1: rank 0 stopped the run with an error (exit 65)" in output


def test_ranks_started_with_different_options_are_refused(learning_sample, tmp_path):
    """Two processes started by hand (as a site's own launcher would), rank 1 with another --lr."""
    import socket

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = []
    for rank, extra in ((0, []), (1, ["--lr", "0.01"])):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        jobs.append(subprocess.Popen([str(BIN / "bidsdl"), str(bids), str(out), "group", *FAST, *extra], env=env,
                                     stderr=subprocess.PIPE, text=True))  # fmt: skip
    errors = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [64, 64], errors
    for err in errors:
        assert "Rank 1 of this distributed run was started with other settings than rank 0 (lr: 0.001 on rank 0" in err
    assert not (out / "learn").exists() and not list((out / "logs").glob("*_group_*"))  # refused before writing


@pytest.mark.slow  # two torchrun processes train end to end: ~1 min each
def test_segmentation_on_two_processes(learning_sample, tmp_path):
    """Patches (and their labels) shared between the ranks; the package as a single process's, within tolerance."""
    from pipeline.sample.generate import LABELS_DIR
    from tests.integration.test_segmentation import SEG

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "out")
    code, output = torchrun(bids, out, *SEG, "--labels", str(bids / LABELS_DIR), "--batch-size", "4")
    assert code == 0, output
    assert "[rank 1] INFO: Rank 1 of 2: trained 1 fold(s) with rank 0" in output
    package = the_package(out)
    assert json.loads((package / "environment.json").read_text())["distributed"]["world_size"] == 2
    scores = pd.read_csv(out / "learn" / "target-structures" / "arch-unet" / "case_scores.tsv", sep="\t")
    assert scores["dice"].notna().any()

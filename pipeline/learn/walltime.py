"""Training that fits a wall-time limit: when the next epoch would not end before the job's deadline, stop with
the checkpoint written (exit 75) so that the same command with ``--resume`` continues.

The deadline is the earlier of ``--time-limit`` (counted from the start of the process) and the end of the SLURM
job that runs it (``SLURM_JOB_END_TIME``, set by SLURM 23.02 and later for batch jobs). A job always trains at least
one epoch before it may stop, so a requeued job always makes progress.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

from ..errors import TimeLimitReached, UsageError

LOGGER = logging.getLogger(__name__)

#: Seconds kept free after training for what follows it (predicting the splits, evaluation, the package).
RESERVE_S = 60.0
#: An epoch is expected to take this much longer than the slowest one so far (a busy node, a validation pass).
EPOCH_MARGIN = 1.25
#: When this invocation started (``--time-limit`` counts from here, as a job's wall time does; the command line
#: marks it again at its start, :func:`mark_start`).
_START = [time.time()]


def mark_start() -> None:
    """The invocation starts now (the command line calls this first)."""
    _START[0] = time.time()

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of a duration: ``90m``, ``2h``, ``1h30m``, ``3600`` (seconds), or SLURM's ``[D-]HH:MM:SS`` / ``MM:SS``.

    >>> parse_duration("2h"), parse_duration("1h30m"), parse_duration("1:30:00"), parse_duration("1-00:00:00")
    (7200.0, 5400.0, 5400.0, 86400.0)
    >>> parse_duration("45")
    45.0
    """
    text = text.strip().lower()
    clock = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if clock and (":" in text or "-" in text):
        days, *parts = clock.groups()
        numbers = [int(p) for p in parts if p is not None]
        while len(numbers) < 3:
            numbers.insert(0, 0)
        hours, minutes, seconds = numbers
        return float(int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pieces = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if not pieces or "".join(f"{n}{u}" for n, u in pieces) != re.sub(r"\s+", "", text):
        raise UsageError(
            f"--time-limit {text!r}: give a duration such as 90m, 2h, 1h30m, 3600 (seconds) or 1:30:00 (SLURM's form)."
        )
    return float(sum(float(n) * _UNITS[u] for n, u in pieces))


def slurm_end_time(environ: dict[str, str] | None = None) -> float | None:
    """The Unix time at which SLURM ends this job (``SLURM_JOB_END_TIME``), or None outside SLURM.

    >>> slurm_end_time({"SLURM_JOB_END_TIME": "1700000000"})
    1700000000.0
    >>> slurm_end_time({}) is None
    True
    """
    value = (os.environ if environ is None else environ).get("SLURM_JOB_END_TIME", "")
    try:
        end = float(value)
    except ValueError:
        return None
    return end if end > 0 else None


@dataclass(frozen=True)
class Deadline:
    """When training must have stopped (Unix time; ``inf``: never), what set it, and the epochs this job has
    trained under it (a fold about to start is expected to take as long as the slowest)."""

    at: float = math.inf
    source: str = ""
    epochs: list[float] = field(default_factory=list, compare=False, repr=False)

    def note_epoch(self, seconds: float) -> None:
        if self.active:
            self.epochs.append(seconds)

    def slowest_epoch(self) -> float:
        """The slowest epoch of this job so far (0 before the first: a job always trains at least one)."""
        return max(self.epochs, default=0.0)

    def check_before(self, *, what: str) -> None:
        """Before training ``what`` in a job that has trained epochs already: stop if one would not fit."""
        if self.slowest_epoch() and self.short(self.slowest_epoch()):
            raise self.error(self.slowest_epoch(), what=what)

    @property
    def active(self) -> bool:
        return math.isfinite(self.at)

    def left(self, now: float | None = None) -> float:
        return self.at - (time.time() if now is None else now)

    def short(self, epoch_s: float, now: float | None = None) -> bool:
        """Whether an epoch of ``epoch_s`` seconds would not end :data:`RESERVE_S` before the deadline."""
        return self.active and self.left(now) < epoch_s * EPOCH_MARGIN + RESERVE_S

    def error(self, epoch_s: float, *, what: str) -> TimeLimitReached:
        left = max(self.left(), 0.0)
        return TimeLimitReached(
            f"Stopped before {self.source}: {left:.0f} s left, and {what} needs ~{epoch_s * EPOCH_MARGIN:.0f} s (its "
            f"slowest epoch so far, +{EPOCH_MARGIN - 1:.0%}) plus {RESERVE_S:.0f} s kept for what follows training. "
            f"The checkpoints are written: run the same command again with --resume to continue where it stopped "
            "(under SLURM: scripts/slurm/group.sbatch requeues itself)."
        )


#: No wall-time limit.
NO_DEADLINE = Deadline()

def deadline(time_limit_s: float | None, *, environ: dict[str, str] | None = None) -> Deadline:
    """The job's deadline: the earlier of ``--time-limit`` (from the process start) and the SLURM job's end."""
    candidates = []
    if time_limit_s is not None:
        candidates.append(Deadline(_START[0] + time_limit_s, f"the --time-limit of {time_limit_s:.0f} s"))
    end = slurm_end_time(environ)
    if end is not None:
        candidates.append(Deadline(end, "the SLURM job's time limit (SLURM_JOB_END_TIME)"))
    return min(candidates, key=lambda d: d.at, default=Deadline())


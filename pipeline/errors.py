"""One error hierarchy for bidsdl.

Every error a user can meet derives from :class:`BidsdlError` and from the builtin that fits, so
callers can catch either. Each carries the exit code of the BIDS execution specification that the
command line returns for it, and a message that names the file, what is wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Exit codes (BIDS execution specification).
EXIT_OK = 0
EXIT_PARTICIPANT_FAILED = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_DATA = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_SOFTWARE = 70
EXIT_CANT_CREATE = 73
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: try again (with --resume)

#: What each exit code means, for ``--help`` and the Boutiques descriptor (:mod:`pipeline.cli.descriptor`).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_PARTICIPANT_FAILED: "a participant failed (the others finished; its log names the step)",
    EXIT_VALIDATION: "BIDS validation failed",
    EXIT_UNKNOWN_LEVEL: "unknown analysis level",
    EXIT_NO_DATA: "the filters selected no data",
    EXIT_USAGE: "usage error",
    EXIT_DATA: "input data error",
    EXIT_NO_INPUT: "BIDS_DIR missing",
    EXIT_SOFTWARE: "internal error (a bug: please report it with the log)",
    EXIT_CANT_CREATE: "OUTPUT_DIR not writable",
    EXIT_TEMPFAIL: "stopped before the time limit or by a lost peer: run the same command again with --resume",
}


class BidsdlError(Exception):
    """Base of every error bidsdl raises on purpose."""

    exit_code: int = EXIT_DATA


class UsageError(BidsdlError, ValueError):
    """The command line or the config file asks for something impossible."""

    exit_code = EXIT_USAGE


class UnknownAnalysisLevel(BidsdlError, ValueError):
    exit_code = EXIT_UNKNOWN_LEVEL


class NoDataSelected(BidsdlError, LookupError):
    """The participant/session filters selected nothing."""

    exit_code = EXIT_NO_DATA


class InputDataError(BidsdlError, ValueError):
    """An input file is unreadable or not what bidsdl needs."""

    exit_code = EXIT_DATA


class QualityCheckFailed(BidsdlError, ValueError):
    """An image's preprocessing is judged failed (registration, brain extraction): its outputs are
    kept for inspection but its participant fails."""

    exit_code = EXIT_DATA


class BidsDirMissing(BidsdlError, FileNotFoundError):
    exit_code = EXIT_NO_INPUT


class OutputNotWritable(BidsdlError, PermissionError):
    exit_code = EXIT_CANT_CREATE


class ReportFailed(BidsdlError, RuntimeError):
    """A report could not be rendered (a bug of bidsdl): a plain page stands in its place, and the run does not
    end as a success (exit 70, EX_SOFTWARE), so nobody takes an earlier run's report for this one's."""

    exit_code = EXIT_SOFTWARE


class TrainingDiverged(BidsdlError, ArithmeticError):
    """The training loss became NaN or infinite: nothing of that epoch is kept."""

    exit_code = EXIT_DATA


class PeerLost(BidsdlError, RuntimeError):
    """Another process of a distributed run failed or was stopped, so this one stops too; a re-run with
    ``--resume`` continues (exit 75, EX_TEMPFAIL: try again)."""

    exit_code = EXIT_TEMPFAIL


class TimeLimitReached(BidsdlError, TimeoutError):
    """Training stopped before the wall-time limit (``--time-limit``, or the SLURM job's end) with its checkpoint
    written: resubmitting the same command with ``--resume`` continues where it stopped (exit 75, EX_TEMPFAIL)."""

    exit_code = EXIT_TEMPFAIL


class PlanFailed(BidsdlError, RuntimeError):
    """``--plan``'s measured run did not finish: no plan is written from it; the exit code is that run's."""

    def __init__(self, message: str, exit_code: int = EXIT_DATA) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code > 0 else EXIT_SOFTWARE


class RunInterrupted(BaseException):
    """A termination signal (SLURM's time limit or ``scancel``, ``docker stop``) reached bidsdl.

    A ``BaseException``, like :class:`KeyboardInterrupt`, so that nothing on the way up swallows it;
    the command line records what was running and exits with ``128 + signal``.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signal_name}")


@dataclass(frozen=True)
class Problem:
    """One finding of the BIDS validation: a file, what is wrong, and how to fix it."""

    path: str
    issue: str
    fix: str
    severity: str = "error"  # "error" stops the run; "warning" is reported and logged

    def __str__(self) -> str:
        return f"{self.path}: {self.issue} Fix: {self.fix}"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "issue": self.issue, "fix": self.fix, "severity": self.severity}


class BidsValidationError(BidsdlError, ValueError):
    """BIDS_DIR is not a valid BIDS dataset; carries every problem found."""

    exit_code = EXIT_VALIDATION

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"BIDS validation found {len(self.problems)} problem(s):\n{lines}\n"
            "Fix them, or pass --skip-bids-validation to proceed at your own risk."
        )


def format_problems(problems: Iterable[Problem]) -> str:
    return "\n".join(f"  - {p}" for p in problems)

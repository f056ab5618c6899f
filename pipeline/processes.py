"""Processes: worker lifetime, termination signals, and torch run out of process.

Everything about the processes bidsdl starts lives here, below the interfaces and learning that use it:
the participant level's Nipype workers, the brain-extraction helper (:mod:`pipeline.interfaces.brain_service`)
and the inference interpreters (:func:`run_module` on the parent's side, :func:`module_main` on the child's).

Termination signals: end cleanly when SLURM, ``docker stop`` or ``kill`` asks.

SLURM sends SIGTERM at a job's time limit or on ``scancel`` (and SIGKILL ``KillWait`` seconds
later); ``docker stop`` does the same. bidsdl turns the signal into
:class:`~pipeline.errors.RunInterrupted` in the main process, records what was running, stops its
worker processes and exits with ``128 + signal``. Forked Nipype workers inherit the handler but
take the default action, so only the main process unwinds.

A main process killed outright (SIGKILL: the kernel's OOM killer on a crowded node) runs no handler,
so its children must notice on their own: :func:`guard_forks` makes every process forked from then on
die with its parent (Linux's parent-death signal, or a watchdog on the parent's pid), and interpreters
started with ``subprocess`` call :func:`die_with_parent` first thing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import BidsdlError, InputDataError, RunInterrupted

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: The environment variable that hands a child interpreter the pid of the process it must not outlive.
PARENT_PID_VARIABLE = "BIDSDL_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_WATCH_S = 0.5


def _parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when the thread that made it ends; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_S)
    os._exit(1)


def die_with_parent(parent: int | None = None, *, from_main_thread: bool = True) -> None:
    """End this process (SIGKILL) as soon as ``parent`` (default: the current parent) is gone.

    The parent-death signal fires when the *thread* that forked ends, so a child of another thread gets a
    watchdog on the parent's pid instead (also where the signal is unavailable). A parent already gone
    (this child was adopted before it got here) ends it at once.
    """
    parent = os.getppid() if parent is None else parent
    if not (from_main_thread and _parent_death_signal(signal.SIGKILL)):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="bidsdl-parent-watch").start()
    if os.getppid() != parent:
        os._exit(1)


_fork_state = threading.local()
_guarded = False


def _before_fork() -> None:
    _fork_state.parent = os.getpid()
    _fork_state.main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    die_with_parent(getattr(_fork_state, "parent", None), from_main_thread=getattr(_fork_state, "main", True))


def guard_forks() -> None:
    """From now on, every process this one forks (Nipype's MultiProc workers, the sample generator's pool) dies
    with it, however it ends."""
    global _guarded
    if not _guarded:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _guarded = True


def child_environment() -> dict[str, str]:
    """The environment for an interpreter this process starts with ``subprocess``: it names this process, which
    the child must not outlive (:func:`die_with_launcher`)."""
    return {**os.environ, PARENT_PID_VARIABLE: str(os.getpid())}


def die_with_launcher() -> None:
    """First thing in an interpreter bidsdl starts: end when the process that started it ends (at once when it is
    already gone: this one then has another parent than :func:`child_environment` named)."""
    launcher = os.environ.get(PARENT_PID_VARIABLE, "")
    die_with_parent(int(launcher) if launcher.isdigit() else None)


@contextlib.contextmanager
def interrupt_on_signals(signals: tuple[int, ...] = HANDLED) -> Iterator[None]:
    """Within the block, the signals raise :class:`RunInterrupted` in this (the main) process."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    main_pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked worker: die as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), from ``/proc``; [] elsewhere."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        # the command name (field 2) may hold spaces and parentheses: fields follow the last ')'
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def terminate_descendants(grace_s: float = 3.0) -> list[int]:
    """SIGTERM every descendant (Nipype workers, inference interpreters), SIGKILL what is left
    after ``grace_s``; returns their PIDs."""
    pids = descendants()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return pids
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie has exited (its parent reaps it)


# --- torch out of process -------------------------------------------------------------------------------------
# torch's OpenMP pool does not survive the fork() that made a Nipype worker: a node that runs networks hands its
# work to a fresh interpreter, ``python -m MODULE SPEC.json OUT_DIR``, which answers with one JSON line on stdout
# (the outputs) or one line on stderr (what is wrong and what to do) and the error's exit code.

#: The file a node writes its request into, in its own folder.
SPEC_FILE = "request.json"


def run_module(module: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run ``module``'s :func:`module_main` on ``spec`` in a fresh interpreter that dies with this process; its
    outputs, or its one-line error as :class:`~pipeline.errors.InputDataError`."""
    out_dir = Path(out_dir)
    request = out_dir / SPEC_FILE
    request.write_text(json.dumps(spec, indent=2) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", module, str(request), str(out_dir)],
        capture_output=True, text=True, check=False, env=child_environment(),
    )  # fmt: skip
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise InputDataError(lines[-1] if lines else f"{module} exited with {done.returncode}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def module_main(work: Callable[[dict[str, Any], Path], dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """The child's side of :func:`run_module`: end with the launcher, do ``work(spec, out_dir)``, answer."""
    die_with_launcher()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        outputs = work(json.loads(Path(args[0]).read_text()), Path(args[1]))
    except BidsdlError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    print(json.dumps(outputs))
    return 0

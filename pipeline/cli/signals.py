"""Termination signals: end cleanly when SLURM, ``docker stop`` or ``kill`` asks.

SLURM sends SIGTERM at a job's time limit or on ``scancel`` (and SIGKILL ``KillWait`` seconds
later); ``docker stop`` does the same. bidsdl turns the signal into
:class:`~pipeline.errors.RunInterrupted` in the main process, records what was running, stops its
worker processes and exits with ``128 + signal``. Forked Nipype workers inherit the handler but
take the default action, so only the main process unwinds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import RunInterrupted

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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

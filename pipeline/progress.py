"""Progress people can read: how many are done, running, failed and left, with an ETA.

On a terminal, one live line at the bottom of the console (log messages print above it); in the log, a
line every :data:`LOG_EVERY_S` seconds and one at the end, so a batch job's log shows the run advancing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import IO

#: Seconds between two progress lines in the log.
LOG_EVERY_S = 30.0
#: Seconds between two redraws of the live line.
_REDRAW_S = 0.5


def _duration(seconds: float) -> str:
    """
    >>> _duration(42), _duration(125), _duration(7384)
    ('42 s', '2 min 5 s', '2 h 3 min')
    """
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def progress_line(
    what: str,
    *,
    total: int,
    done: int,
    failed: int = 0,
    running: int = 0,
    elapsed_s: float,
    now: datetime,
    steps: tuple[int, int] | None = None,
) -> str:
    """One progress line; the ETA comes from the rate at which items have finished so far, or, with
    ``steps`` (finished, all) of the finer units the items are made of, from the rate of those: participants
    run side by side often all finish near the end, their steps (workflow nodes) finish all along.

    >>> t = datetime(2026, 1, 1, 12, 0, 0)
    >>> progress_line("participants", total=100, done=20, failed=1, running=2, elapsed_s=420, now=t)
    'participants: 20 done, 2 running, 1 failed, 77 left of 100 (21%); 7 min 0 s elapsed, ETA 26 min 20 s (12:26)'
    >>> progress_line("images", total=5, done=0, elapsed_s=3, now=t)
    'images: 0 done, 5 left of 5 (0%); 3 s elapsed, ETA after the first one'
    >>> progress_line("participants", total=4, done=0, running=2, elapsed_s=60, now=t, steps=(30, 120))
    'participants: 0 done, 2 running, 2 left of 4; steps 30 of 120 (25%); 1 min 0 s elapsed, ETA 3 min 0 s (12:03)'
    """
    finished = done + failed
    left = max(total - finished - running, 0)
    parts = [f"{done} done"]
    if running:
        parts.append(f"{running} running")
    if failed:
        parts.append(f"{failed} failed")
    line = f"{what}: {', '.join(parts)}, {left} left of {total}"
    if steps is not None and finished < total:
        units_done, units = steps
        share = units_done / units if units else 1.0
        line += f"; steps {units_done} of {units} ({share * 100:.0f}%)"
    else:
        share = finished / total if total else 1.0
        line += f" ({share * 100:.0f}%)"
    line += f"; {_duration(elapsed_s)} elapsed"
    if finished >= total:
        return line
    if share <= 0:
        return line + ", ETA after the first one"
    remaining_s = elapsed_s * (1 - share) / share
    return line + f", ETA {_duration(remaining_s)} ({(now + timedelta(seconds=remaining_s)):%H:%M})"


@contextlib.contextmanager
def timed(what: str, logger: logging.Logger) -> Iterator[None]:
    """Log how long the block took, as ``Timing: <what> <seconds>s`` (benchmarks read these lines)."""
    started = time.monotonic()
    try:
        yield
    finally:
        logger.info("Timing: %s %.2fs", what, time.monotonic() - started)


class LiveLine:
    """The console's last line, redrawn in place; :class:`ConsoleHandler` clears it around each log record."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.text = ""
        self.lock = threading.RLock()

    @property
    def enabled(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except (ValueError, OSError):  # a stream closed since (a finished run's captured console)
            return False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.text = text
            self._draw()

    def _draw(self) -> None:
        self.stream.write("\r\x1b[2K" + self.text)
        self.stream.flush()

    def clear(self) -> None:
        with self.lock:
            if self.text and self.enabled:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()

    def redraw(self) -> None:
        with self.lock:
            if self.text and self.enabled:
                self._draw()

    def drop(self) -> None:
        """Take the line off the screen for good."""
        with self.lock:
            self.clear()
            self.text = ""


#: The console's live line (one per process: one console).
LIVE = LiveLine()


class ConsoleHandler(logging.StreamHandler):
    """bidsdl's console handler: a log record prints above the live line, which is then drawn again."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        LIVE.stream = self.stream

    def emit(self, record: logging.LogRecord) -> None:
        with LIVE.lock:
            LIVE.clear()
            super().emit(record)
            LIVE.redraw()


class Progress:
    """Counts of one long step (participants, images, epochs), shown live and logged periodically.

    ``live``: draw on the terminal too (when the console is one and shows INFO messages).
    """

    def __init__(self, what: str, total: int, *, logger: logging.Logger, live: bool = True,
                 log_every_s: float = LOG_EVERY_S) -> None:  # fmt: skip
        self.what, self.total, self.logger = what, total, logger
        self.live = live and LIVE.enabled and _console_shows_info()
        self.log_every_s = log_every_s
        self.started = time.monotonic()
        self.done = self.failed = self.running = 0
        self.steps: tuple[int, int] | None = None  # (finished, all) of the items' finer units, when counted
        self._logged = self._drawn = self.started

    def line(self) -> str:
        return progress_line(
            self.what,
            total=self.total,
            done=self.done,
            failed=self.failed,
            running=self.running,
            elapsed_s=time.monotonic() - self.started,
            now=datetime.now(),
            steps=self.steps,
        )

    def update(self, *, done: int | None = None, failed: int | None = None, running: int | None = None,
               show: bool = True) -> None:  # fmt: skip
        """New counts; ``show``: log or draw them now if it is time (not between two events that belong together)."""
        self.done = self.done if done is None else done
        self.failed = self.failed if failed is None else failed
        self.running = self.running if running is None else running
        if not show:
            return
        now = time.monotonic()
        if now - self._logged >= self.log_every_s:
            self._logged = now
            self.logger.info("Progress: %s", self.line())
        elif self.live and now - self._drawn >= _REDRAW_S:
            self._drawn = now
            LIVE.show(self.line())

    def advance(self, n: int = 1, *, failed: bool = False) -> None:
        if failed:
            self.update(failed=self.failed + n)
        else:
            self.update(done=self.done + n)

    def finish(self) -> None:
        """The last line, in the log (the live line gives way to it)."""
        if self.live:
            LIVE.drop()
        self.logger.info("Progress: %s", self.line())


def _console_shows_info() -> bool:
    handlers = [h for h in logging.getLogger("pipeline").handlers if isinstance(h, ConsoleHandler)]
    return any(h.level <= logging.INFO for h in handlers)


class WorkflowProgress:
    """Nipype's ``status_callback``: the nodes' start, end and failure events counted per participant.

    A participant is done when every one of its nodes has ended (run or found cached), failed at its first
    failed node, and running while one of its nodes is (Nipype interleaves participants: one that has
    started and waits for a free process counts as left). The ETA comes from the share of nodes ended.
    ``owners`` maps the first part of a node's name below the top workflow (a participant's workflow) to
    the participant.
    """

    def __init__(
        self, node_names: list[str], top: str, owners: dict[str, str], *, logger: logging.Logger,
        on_done: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self._owner_of = owners
        self._on_done = on_done
        self._remaining: dict[str, set[str]] = {label: set() for label in owners.values()}
        for name in node_names:
            label = owners.get(name.split(".", 1)[0])
            if label is not None:
                self._remaining[label].add(f"{top}.{name}")
        self._executing: dict[str, set[str]] = {label: set() for label in self._remaining}
        self._failed: set[str] = set()
        self._done: set[str] = set()
        self._nodes = sum(len(nodes) for nodes in self._remaining.values())
        self._nodes_ended = self._running = 0
        self.progress = Progress("participants", len(self._remaining), logger=logger)
        self.progress.steps = (0, self._nodes)

    def __call__(self, node: object, status: str) -> None:
        fullname = str(getattr(node, "fullname", ""))
        parts = fullname.split(".")
        label = self._owner_of.get(parts[1]) if len(parts) > 2 else None
        if label is None or label in self._failed or label in self._done:
            return
        remaining, executing = self._remaining[label], self._executing[label]
        was_running = bool(executing)
        if status == "start":
            if fullname in remaining:
                executing.add(fullname)
        elif status == "exception":
            self._failed.add(label)
            self._nodes_ended += len(remaining)  # what is left of a failed participant will not run
            remaining.clear()
            executing.clear()
        elif status == "end" and fullname in remaining:
            remaining.discard(fullname)
            executing.discard(fullname)
            self._nodes_ended += 1
            if not remaining:
                self._done.add(label)
                if self._on_done is not None:  # its outputs are all written: its status and report now
                    self._on_done(label)
        self._running += bool(executing) - was_running  # kept as a count: one event costs the same at any size
        self.progress.steps = (self._nodes_ended, self._nodes)
        # shown at a start or a failure: at a node's end the scheduler has not yet started the next one
        self.progress.update(
            done=len(self._done), failed=len(self._failed), running=self._running, show=status != "end"
        )

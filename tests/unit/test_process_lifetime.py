"""Children never outlive a bidsdl process killed outright (SIGKILL runs no handler)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# A process that guards its forks, forks a sleeper (from its main thread, or from another thread), prints the
# sleeper's pid and waits to be killed.
_PARENT = textwrap.dedent(
    """
    import os, sys, threading, time
    from pipeline.processes import guard_forks
    guard_forks()
    def fork():
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        print(pid, flush=True)
    if sys.argv[1] == "thread":
        worker = threading.Thread(target=fork)
        worker.start()
        worker.join()
    else:
        fork()
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("forked_from", ["main", "thread"])
def test_a_forked_child_ends_with_its_killed_parent(forked_from):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, forked_from], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(child), f"the child forked from the {forked_from} thread outlived its parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_an_interpreter_started_by_bidsdl_ends_when_its_launcher_is_gone():
    from pipeline.processes import PARENT_PID_VARIABLE

    env = {**os.environ, PARENT_PID_VARIABLE: "1"}  # named a launcher that is not its parent: already adopted
    code = "from pipeline.processes import die_with_launcher; die_with_launcher(); print('still here')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "still here" not in done.stdout

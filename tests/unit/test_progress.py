"""Progress: counts from Nipype's node events, a live terminal line that log records print above, log lines."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

from pipeline import progress as pg


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _node(name: str) -> SimpleNamespace:
    return SimpleNamespace(fullname=f"bidsdl_wf.{name}")


def test_node_events_become_participant_counts(caplog):
    names = ["sub_01_wf.anat_wf.a", "sub_01_wf.anat_wf.b", "sub_02_wf.anat_wf.a", "sub_03_wf.anat_wf.a"]
    owners = {"sub_01_wf": "01", "sub_02_wf": "02", "sub_03_wf": "03"}
    tracker = pg.WorkflowProgress(names, "bidsdl_wf", owners, logger=logging.getLogger("pipeline.test"))
    p = tracker.progress
    tracker(_node("sub_01_wf.anat_wf.a"), "start")
    tracker(_node("sub_02_wf.anat_wf.a"), "start")
    assert (p.done, p.running, p.failed) == (0, 2, 0)
    tracker(_node("sub_01_wf.anat_wf.a"), "end")
    assert (p.done, p.running) == (0, 1)  # sub-01 has another node to run, none running: it waits
    assert p.steps == (1, 4)
    tracker(_node("sub_02_wf.anat_wf.a"), "exception")
    tracker(_node("sub_01_wf.anat_wf.b"), "start")
    tracker(_node("sub_01_wf.anat_wf.b"), "end")
    tracker(_node("sub_01_wf.anat_wf.b"), "end")  # a repeated event counts once
    tracker(_node("elsewhere.x"), "end")  # not a participant's node
    assert (p.done, p.running, p.failed) == (1, 0, 1)
    with caplog.at_level(logging.INFO, logger="pipeline.test"):
        p.finish()
    # the ETA comes from the nodes ended (sub-02's node will not run: it failed)
    assert "participants: 1 done, 1 failed, 1 left of 3; steps 3 of 4 (75%)" in caplog.text


def test_the_live_line_gives_way_to_log_records(monkeypatch):
    terminal = _Terminal()
    logger = logging.getLogger("pipeline.test_live")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = pg.ConsoleHandler(terminal)
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    monkeypatch.setattr(pg, "_console_shows_info", lambda: True)
    monkeypatch.setattr(pg, "_REDRAW_S", 0.0)
    try:
        progress = pg.Progress("images", 4, logger=logger, log_every_s=3600)
        assert progress.live
        progress.advance()
        logger.warning("something to say")
        progress.advance()
        progress.finish()
    finally:
        logger.removeHandler(handler)
        pg.LIVE.stream = None  # type: ignore[assignment]
    screen = terminal.getvalue()
    assert "\r\x1b[2Kimages: 1 done, 3 left of 4" in screen  # drawn in place
    before, after = screen.split("something to say\n")
    assert before.endswith("\r\x1b[2K")  # the live line was cleared before the record
    assert after.startswith("\r\x1b[2Kimages: 1 done")  # and drawn again below it
    last = screen.rsplit("\r\x1b[2K", 1)[-1]  # the live line dropped, the last line logged in its place
    assert last.startswith("Progress: images: 2 done, 2 left of 4 (50%)") and last.endswith("\n")


def test_a_batch_log_gets_periodic_lines(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(pg.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="pipeline.test_batch"):
        progress = pg.Progress("participants", 10, logger=logging.getLogger("pipeline.test_batch"), log_every_s=30)
        for _ in range(7):  # one finishes every 10 s: a line at 30 s and at 60 s
            now[0] += 10
            progress.advance()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress:")]
    assert lines == [
        "Progress: participants: 3 done, 7 left of 10 (30%); 30 s elapsed, ETA 1 min 10 s" + lines[0][-8:],
        "Progress: participants: 6 done, 4 left of 10 (60%); 1 min 0 s elapsed, ETA 40 s" + lines[1][-8:],
    ]


def test_workflow_lines_are_logged_when_a_step_starts_not_between_two(caplog, monkeypatch):
    """At a node's end the scheduler has not started the next one yet: a line then would say 0 running."""
    now = [0.0]
    monkeypatch.setattr(pg.time, "monotonic", lambda: now[0])
    names = ["sub_01_wf.anat_wf.a", "sub_01_wf.anat_wf.b", "sub_02_wf.anat_wf.a"]
    owners = {"sub_01_wf": "01", "sub_02_wf": "02"}
    with caplog.at_level(logging.INFO, logger="pipeline.test_steps"):
        tracker = pg.WorkflowProgress(names, "bidsdl_wf", owners, logger=logging.getLogger("pipeline.test_steps"))
        tracker(_node("sub_01_wf.anat_wf.a"), "start")
        now[0] = 40.0
        tracker(_node("sub_01_wf.anat_wf.a"), "end")
        assert not caplog.records
        tracker(_node("sub_01_wf.anat_wf.b"), "start")
    assert [r.getMessage()[:-8] for r in caplog.records] == [
        "Progress: participants: 0 done, 1 running, 1 left of 2; steps 1 of 3 (33%); 40 s elapsed, ETA 1 min 20 s"
    ]

"""Participants one after another: Nipype plugins that keep at most ``limit`` participants in flight.

Nipype's MultiProc starts every ready node of every participant in graph order, so on 80 participants
and two processes each one has started and none has finished for most of the run ("0 done, 2 running,
78 left"), and a run killed at 90% leaves no participant done. Here a participant's nodes go first once
it has started, and a new participant starts only while fewer than ``limit`` are in flight: results
(derivatives, status, report) appear steadily, one participant after another, as fMRIPrep's users
expect of ``--nprocs`` on a node shared by many subjects.

``owner`` maps a node's full name to its participant's position in the run (None: no participant's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
from nipype.pipeline.plugins.linear import LinearPlugin
from nipype.pipeline.plugins.multiproc import MultiProcPlugin

#: A node's full name -> the position of its participant in the run (None: a node of no participant).
Owner = Callable[[str], "int | None"]


def admitted_jobs(
    jobids: np.ndarray, owners: np.ndarray, started: np.ndarray, finished: np.ndarray, limit: int
) -> list[int]:
    """The ready jobs ``jobids`` that may start now, in the order to try them: jobs of no participant (owner -1),
    then of the participants in flight (started, not finished), then of the next participants not yet started
    while fewer than ``limit`` are in flight; each group in the participants' order.

    ``owners``: each job's participant; ``started``/``finished``: per participant.

    >>> admitted_jobs(np.array([0, 1, 2, 3]), np.array([2, 1, 0, -1]), np.array([False, True, False]),
    ...               np.array([False, False, False]), limit=2)
    [3, 1, 2]
    """
    in_flight = started & ~finished
    room = max(0, limit - int(in_flight.sum()))
    waiting = np.flatnonzero(~started)
    allowed = in_flight.copy()
    allowed[waiting[:room]] = True
    mine = owners[jobids]
    keep = (mine < 0) | allowed[np.maximum(mine, 0)]
    chosen, whose = jobids[keep], mine[keep]
    queued = (whose >= 0) & ~in_flight[np.maximum(whose, 0)]  # new participants after those in flight
    return [int(j) for j in chosen[np.lexsort((whose, queued))]]


class ParticipantsInTurn(MultiProcPlugin):
    """Nipype's MultiProc with at most ``limit`` participants in flight, the others queued in order."""

    def __init__(self, plugin_args: dict[str, Any], *, owner: Owner, n_participants: int, limit: int) -> None:
        super().__init__(plugin_args=plugin_args)
        self._owner, self._n, self._limit = owner, n_participants, max(1, limit)
        self._owners: np.ndarray | None = None

    def _sort_jobs(self, jobids: Any, scheduler: str | None = "tsort") -> list[int]:
        jobids = np.asarray(super()._sort_jobs(jobids, scheduler=scheduler), dtype=int)
        if self._owners is None or len(self._owners) != len(self.procs):  # the graph is known once it runs
            self._owners = np.array([_position(self._owner, p.fullname) for p in self.procs], dtype=int)
        owners, done, pending = self._owners, np.asarray(self.proc_done), np.asarray(self.proc_pending)
        owned = owners >= 0
        per = np.bincount(owners[owned], minlength=self._n)
        started = np.bincount(owners[owned & done], minlength=self._n) > 0
        ended = np.bincount(owners[owned & done & ~pending], minlength=self._n)
        return admitted_jobs(jobids, owners, started, ended == per, self._limit)


class ParticipantsInOrder(LinearPlugin):
    """Nipype's Linear plugin, one participant's nodes after another's (its order: the run's), so each
    participant finishes before the next starts. A failed node stops its participant only; the first error
    is raised when every participant has run, as Linear does."""

    def __init__(self, plugin_args: dict[str, Any], *, owner: Owner) -> None:
        super().__init__(plugin_args=plugin_args)
        self._owner = owner

    def run(self, graph: nx.DiGraph, config: Any, updatehash: bool = False) -> None:
        parts = [graph.subgraph(nodes).copy() for nodes in nx.weakly_connected_components(graph)]
        parts.sort(key=lambda part: min(_position(self._owner, n.fullname) for n in part.nodes()))
        errors = []
        for part in parts:
            try:
                super().run(part, config, updatehash=updatehash)
            except Exception as exc:  # Nipype reports the failed nodes; the next participant runs
                errors.append(exc)
                if str(config["execution"]["stop_on_first_crash"]).lower() == "true":
                    break
        if errors:
            raise RuntimeError(f"{len(errors)} participant(s) did not execute cleanly") from errors[0]


def _position(owner: Owner, fullname: str) -> int:
    position = owner(fullname)
    return -1 if position is None else position

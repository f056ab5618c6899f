"""The Boutiques descriptor of the ``bidsdl`` command line (``bidsdl.json``), generated from the parser.

Platforms that run tools from descriptors (CBRAIN, and Boutiques' own ``bosh exec``) read it; it is written from
:func:`~pipeline.cli.parser.build_parser`, never by hand, so it cannot drift from the command line: the suite
regenerates it, compares it with the committed file and validates it with Boutiques' validator.

    python -m pipeline.cli.descriptor > bidsdl.json

How argparse maps onto Boutiques: a path option is a ``File`` when bidsdl reads it and a ``String`` when it writes
there; ``nargs`` lists are lists; an option given once per value (``--fold 0 --fold 1``) is a list whose separator
repeats the flag; ``--amp``/``--no-amp`` are two flags that disable each other; ``--help`` and ``--version``
are left out (a platform runs analyses).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_CODES
from .parser import _fraction, _non_negative_int, _positive_float, _positive_int, build_parser

SCHEMA_VERSION = "0.5"
#: The image the descriptor runs in (the README's ``docker build -t``).
CONTAINER_IMAGE = f"bidsdl:{__version__}"
#: Path options bidsdl writes into (a platform must not expect them to exist): ``String``, not ``File``.
_WRITTEN_PATHS = frozenset({"output_dir", "work_dir", "bids_database_dir"})
DERIVATIVES_DESCRIPTION = ("the BIDS derivatives dataset: preprocessed images, quality metrics, reports, learning "
                           "results and model packages")
_LEFT_OUT = frozenset({"help", "version"})
#: The numeric argument types and their bounds: (integer, minimum, exclusive minimum, maximum, exclusive maximum).
_NUMBERS: dict[Any, tuple[bool, float | None, bool, float | None, bool]] = {
    int: (True, None, False, None, False),
    float: (False, None, False, None, False),
    _positive_int: (True, 1, False, None, False),
    _non_negative_int: (True, 0, False, None, False),
    _positive_float: (False, 0, True, None, False),
    _fraction: (False, 0, True, 1, True),
}


def _input_id(action: argparse.Action, flag: str | None = None) -> str:
    """A Boutiques input id (letters, digits, underscores): the long flag's name, or the positional's.

    >>> _input_id(argparse.Action(["--no-amp"], "amp"), "--no-amp")
    'no_amp'
    """
    name = (flag or max(action.option_strings, key=len, default=action.dest)).lstrip("-")
    return re.sub(r"\W", "_", name)


def _value_key(identifier: str) -> str:
    return f"[{identifier.upper()}]"


def _flag_input(action: argparse.Action, flag: str, description: str) -> dict[str, Any]:
    identifier = _input_id(action, flag)
    return {"id": identifier, "name": flag, "type": "Flag", "description": description, "optional": True,
            "command-line-flag": flag, "value-key": _value_key(identifier)}  # fmt: skip


def _inputs_of(action: argparse.Action) -> list[dict[str, Any]]:
    """The descriptor's inputs for one parser action (two for a ``--x/--no-x`` option, none for help/version)."""
    if action.dest in _LEFT_OUT or isinstance(action, argparse._HelpAction | argparse._VersionAction):
        return []
    description = (action.help or "").replace("%%", "%")
    if isinstance(action, argparse.BooleanOptionalAction):
        on, off = action.option_strings
        inputs = [_flag_input(action, on, description), _flag_input(action, off, f"the opposite of {on}")]
        inputs[0]["disables-inputs"], inputs[1]["disables-inputs"] = [inputs[1]["id"]], [inputs[0]["id"]]
        return inputs
    if isinstance(action, argparse._StoreConstAction | argparse._CountAction):  # store_true/false, -v
        return [_flag_input(action, max(action.option_strings, key=len), description)]
    identifier = _input_id(action)
    entry: dict[str, Any] = {"id": identifier, "name": identifier.replace("_", " "), "description": description,
                             "value-key": _value_key(identifier), "optional": bool(action.option_strings)}  # fmt: skip
    if action.type is Path:
        entry["type"] = "String" if action.dest in _WRITTEN_PATHS else "File"
    elif action.type in _NUMBERS:
        integer, low, low_open, high, high_open = _NUMBERS[action.type]
        entry["type"], entry["integer"] = "Number", integer
        if low is not None:
            entry["minimum"], entry["exclusive-minimum"] = low, low_open
        if high is not None:
            entry["maximum"], entry["exclusive-maximum"] = high, high_open
    else:
        entry["type"] = "String"
    if action.dest == "analysis_level":
        entry["value-choices"] = ["participant", "group"]
    elif action.choices:
        entry["value-choices"] = list(action.choices)
    flag = max(action.option_strings, key=len) if action.option_strings else None
    if flag:
        entry["command-line-flag"] = flag
    if isinstance(action, argparse._AppendAction):  # --fold 0 --fold 1: the flag before every value
        entry["list"], entry["list-separator"], entry["min-list-entries"] = True, f" {flag} ", 1
    elif action.nargs in ("+", "*"):
        entry["list"] = True
        if action.nargs == "+":
            entry["min-list-entries"] = 1
    return [entry]


def descriptor() -> dict[str, Any]:
    """The Boutiques descriptor of ``bidsdl`` as it is now (inputs in the parser's order)."""
    parser = build_parser()
    inputs = [entry for action in parser._actions for entry in _inputs_of(action)]
    groups = [{"id": re.sub(r"\W+", "_", group.title or "").strip("_"), "name": group.title,
               "members": [e["id"] for a in group._group_actions for e in _inputs_of(a)]}
              for group in parser._action_groups if group.title and group._group_actions]  # fmt: skip
    groups = [g for g in groups if g["members"]]
    return {
        "name": "bidsdl",
        "tool-version": __version__,
        "schema-version": SCHEMA_VERSION,
        "description": parser.description,
        "author": "The bidsdl developers",
        "url": "https://github.com/bidsdl/bidsdl",
        "command-line": " ".join(["bidsdl", *(entry["value-key"] for entry in inputs)]),
        "container-image": {"type": "docker", "image": CONTAINER_IMAGE},
        "inputs": inputs,
        "groups": groups,
        "output-files": [{"id": "derivatives", "name": "derivatives", "path-template": "[OUTPUT_DIR]",
                          "description": DERIVATIVES_DESCRIPTION}],
        "error-codes": [{"code": code, "description": meaning} for code, meaning in EXIT_CODES.items() if code],
        "tags": {"domain": ["neuroinformatics", "mri", "deep-learning"], "bids-app": True},
    }


def render() -> str:
    """The descriptor as ``bidsdl.json`` holds it."""
    return json.dumps(descriptor(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())

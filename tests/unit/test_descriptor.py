"""The Boutiques descriptor (``bidsdl.json``): generated from the parser, committed, valid, and it round-trips: a
command line Boutiques makes from an invocation parses into the options the invocation named."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from pipeline.cli.descriptor import descriptor, render
from pipeline.cli.parser import parse_args

boutiques = pytest.importorskip("boutiques")
ROOT = Path(__file__).resolve().parents[2]


def test_committed_descriptor_is_the_generated_one():
    committed = (ROOT / "bidsdl.json").read_text()
    assert committed == render(), (
        "bidsdl.json differs from the parser: regenerate it with 'python -m pipeline.cli.descriptor > bidsdl.json'"
    )


def test_descriptor_is_valid_boutiques():
    from boutiques.validator import validate_descriptor

    validated = validate_descriptor(descriptor())
    ids = {entry["id"] for entry in validated["inputs"]}
    assert {"bids_dir", "output_dir", "analysis_level", "participant_label", "target", "amp", "no_amp"} <= ids
    assert not {"help", "version"} & ids
    kinds = {entry["id"]: entry["type"] for entry in validated["inputs"]}
    assert kinds["bids_dir"] == "File" and kinds["output_dir"] == "String" and kinds["work_dir"] == "String"
    assert kinds["outer_folds"] == "Number" and kinds["no_baseline"] == "Flag"
    assert {c["code"] for c in validated["error-codes"]} >= {1, 16, 64, 65, 75}


def test_invocation_round_trips_through_the_parser(tmp_path):
    from boutiques import bosh

    (tmp_path / "bidsdl.json").write_text(render())
    invocation = {"bids_dir": "/data/bids", "output_dir": "/data/out", "analysis_level": "group",
                  "target": "diagnosis", "inputs": ["GM", "logjacobian"], "outer_folds": 5, "fold": [0, 2],
                  "test_size": 0.25, "no_amp": True, "no_baseline": True,
                  "participant_label": ["01", "02"]}  # fmt: skip
    (tmp_path / "invocation.json").write_text(json.dumps(invocation))
    command = bosh(["exec", "simulate", str(tmp_path / "bidsdl.json"), "-i", str(tmp_path / "invocation.json")])
    argv = shlex.split(command.shell_command)
    assert argv[0] == "bidsdl"
    config = parse_args(argv[1:])
    assert config.analysis_level == "group" and config.target == "diagnosis"
    assert config.inputs == ("GM", "logjacobian") and config.outer_folds == 5 and config.fold == (0, 2)
    assert config.test_size == 0.25 and config.amp is False and config.baseline is False
    assert config.participant_label == ("01", "02")


def test_opposite_flags_disable_each_other():
    # (Boutiques 0.5.33 does refuse an invocation with both, but through a crash in jsonschema's error ranking:
    # the declaration is what is tested here)
    entries = {entry["id"]: entry for entry in descriptor()["inputs"]}
    assert entries["amp"]["disables-inputs"] == ["no_amp"] and entries["no_amp"]["disables-inputs"] == ["amp"]
    assert entries["fold"]["list-separator"] == " --fold "

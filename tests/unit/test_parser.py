"""The command-line contract: options, config files, and exit codes that never leak argparse's 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.cli.parser import parse_args
from pipeline.config import load_config_file
from pipeline.errors import UnknownAnalysisLevel, UsageError


def test_labels_accept_both_forms_and_are_sorted():
    config = parse_args(["/in", "/out", "participant", "--participant-label", "sub-02", "01", "02"])
    assert config.participant_label == ("01", "02")
    config = parse_args(["/in", "/out", "participant", "--session-label", "ses-b", "a"])
    assert config.session_label == ("a", "b")


@pytest.mark.parametrize("label", ["../x", "sub-01/../02", "a b", "sub-", "01_02"])
def test_labels_with_path_characters_are_refused(label):
    with pytest.raises(UsageError, match="Invalid sub label"):
        parse_args(["/in", "/out", "participant", "--participant-label", label])


def test_defaults():
    config = parse_args(["in", "out", "group"])
    assert config.seed == 42
    assert config.nprocs >= 1 and config.omp_nthreads == min(8, config.nprocs)
    assert config.mem_gb > 0
    assert config.bids_dir.is_absolute() and config.output_dir.is_absolute()
    assert config.work_dir is None  # resolved to OUTPUT_DIR/.bidsdl_work at run time
    assert config.verbosity == 0


def test_verbosity_and_quiet():
    assert parse_args(["i", "o", "group", "-vv"]).verbosity == 2
    assert parse_args(["i", "o", "group", "-q"]).verbosity == -1


def test_unknown_level():
    with pytest.raises(UnknownAnalysisLevel):
        parse_args(["i", "o", "subject"])


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["i"],
        ["i", "o"],
        ["i", "o", "group", "--nprocs", "0"],
        ["i", "o", "group", "--bogus"],
        ["i", "o", "group", "--participant-index", "-1"],
        ["i", "o", "group", "--seed", "x"],
    ],
)
def test_usage_errors_raise_usage_error(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        ([], 64),
        (["i", "o", "group", "--bogus"], 64),
        (["i", "o", "subject"], 17),
        (["i", "o", "participant", "--participant-label", "../x"], 64),
    ],
)
def test_main_exit_codes(run_cli, argv, code):
    exit_code, _, err = run_cli(*argv)
    assert exit_code == code
    assert "bidsdl: error:" in err


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0
    assert out.strip() == f"bidsdl {__version__}"


def test_help_exits_zero(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0
    assert "--participant-index" in out and "Exit codes" in out


def test_config_file_yaml_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "run.yml"
    cfg.write_text("participant-label: ['01', '02']\nnprocs: 1\nseed: 7\nskip_bids_validation: true\n")
    config = parse_args(["i", "o", "participant", "--config", str(cfg), "--seed", "9"])
    assert config.participant_label == ("01", "02")
    assert config.nprocs == 1
    assert config.seed == 9  # the command line wins
    assert config.skip_bids_validation is True
    assert config.config_file == cfg


def test_config_file_json_and_round_trip(tmp_path):
    first = parse_args(["i", "o", "participant", "--participant-label", "03", "--seed", "5", "-v"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(first.to_dict()))
    again = parse_args(["i", "o", "participant", "--config", str(saved)])
    assert again.participant_label == first.participant_label
    assert again.seed == 5 and again.verbosity == 1
    assert again.config_hash() == first.config_hash()


@pytest.mark.parametrize("flags", [["--amp", "--no-refresh-subject-reports"], ["--no-amp", "--refresh-subject-reports"],
                                   []])
def test_switches_with_a_no_form_round_trip_through_a_config_file(tmp_path, flags):
    first = parse_args(["i", "o", "group", "--target", "age", *flags])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(first.to_dict()))
    again = parse_args(["i", "o", "group", "--config", str(saved)])
    assert (again.amp, again.refresh_subject_reports) == (first.amp, first.refresh_subject_reports)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nprocs: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("colour: blue\n", "Unknown option 'colour'"),
        ("nprocs: 0\n", "at least 1"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_args(["i", "o", "group", "--config", str(cfg)])


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="Cannot read the config file"):
        parse_args(["i", "o", "group", "--config", str(tmp_path / "nope.yml")])


def test_config_hash_ignores_resources_but_not_seed_or_threads():
    a = parse_args(["i", "o", "participant", "--nprocs", "1"])
    c = parse_args(["i", "o", "participant", "--nprocs", "1", "--seed", "1"])
    d = parse_args(["i", "o", "participant", "--nprocs", "1", "--omp-nthreads", "1"])
    e = parse_args(["i", "o", "participant", "--nprocs", "1", "--omp-nthreads", "2"])
    assert a.config_hash() != c.config_hash() and d.config_hash() != e.config_hash()
    assert (
        parse_args(["i", "o", "participant", "--omp-nthreads", "1", "--mem-gb", "3"]).config_hash() == d.config_hash()
    )


def test_empty_config_file(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    assert load_config_file(cfg) == {}
    assert parse_args(["i", "o", "group", "--config", str(cfg)]).seed == 42


def test_positionals_in_config_are_ignored(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"bids_dir": "/elsewhere", "analysis_level": "group", "seed": 3}))
    config = parse_args(["in", "out", "participant", "--config", str(cfg)])
    assert config.bids_dir == Path("in").absolute() and config.analysis_level == "participant"
    assert config.seed == 3


def test_fold_selects_folds_of_a_study():
    config = parse_args(["/in", "/out", "group", "--target", "dx", "--n-folds", "3", "--fold", "2", "--fold", "0"])
    assert config.fold == (0, 2) and "fold" not in config.learning_settings()  # fold jobs share their settings
    assert parse_args(["/in", "/out", "group", "--target", "dx"]).fold == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "dx", "--fold", "5"], "--fold 5 is out of range: --n-folds 5 makes folds 0 to 4"),
        (["--target", "dx", "--n-folds", "1", "--fold", "1"], "makes folds 0 to 0"),
        (["--fold", "0"], "use it with --target"),
        (["--fold", "-1"], "must be 0 or more"),
    ],
)
def test_bad_fold_selection(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["/in", "/out", "group", *argv])


def test_help_shows_each_tasks_own_defaults_from_the_task_objects(run_cli):
    """--help is generated from RunConfig and the task objects: a task's default that differs is shown beside the
    general one, never written into a help string by hand."""
    from pipeline.config import RunConfig
    from pipeline.learn.registry import get_task, task_names

    code, out, _ = run_cli("--help")
    text = " ".join(out.split())  # argparse wraps lines
    assert code == 0
    assert f"--lr X learning rate of AdamW (default {RunConfig.lr:g}" in text
    assert f"registrations (default {RunConfig.seed})" in text  # --seed: generated too, not hand-written
    for name in task_names():
        task = get_task(name)
        for option, value in task.defaults.items():
            if option in ("lr", "batch_size", "architecture", "model_resolution"):
                assert f"{name} {value:g}" in text if isinstance(value, float) else f"{name} {value}" in text
        assert f"{name}: {', '.join(task.architectures)}" in text


def test_trust_options():
    config = parse_args(["i", "o", "group", "--target", "dx"])
    assert config.baseline and not config.permutation_control and config.search == 0 and config.time_limit is None
    config = parse_args(["i", "o", "group", "--target", "dx", "--no-baseline", "--permutation-control", "--search",
                         "4", "--trial", "3", "--trial", "1", "--time-limit", "1:30:00", "--init-from", "m",
                         "--freeze"])  # fmt: skip
    assert not config.baseline and config.permutation_control and config.trial == (1, 3)
    assert config.time_limit == 5400.0 and config.init_from == Path("m").absolute() and config.freeze
    learning = config.learning_settings()
    assert learning["baseline"] is False and learning["search"] == 4 and "trial" not in learning
    assert "time_limit" not in learning  # a resumed run may be given another limit


def test_baseline_off_in_a_config_file(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("target: dx\nbaseline: false\n")
    assert parse_args(["i", "o", "group", "--config", str(path)]).baseline is False
    path.write_text("target: dx\nbaseline: true\n")
    assert parse_args(["i", "o", "group", "--config", str(path)]).baseline is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trial", "0"], "use it with --search N"),
        (["--search", "2", "--trial", "2"], "--trial 2 is out of range"),
        (["--search", "2", "--fold", "0"], "--fold cannot be combined with --search"),
        (["--freeze"], "use it with --init-from"),
        (["--time-limit", "soon"], "--time-limit"),
    ],
)
def test_bad_trust_options(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["i", "o", "group", "--target", "dx", *argv])


def test_permutation_control_needs_one_target_per_participant():
    with pytest.raises(UsageError, match="--permutation-control shuffles one target per participant"):
        parse_args(["i", "o", "group", "--task", "segmentation", "--labels", "L", "--label-desc", "aseg",
                    "--permutation-control"])  # fmt: skip

"""Shared fixtures: small BIDS datasets made on the fly, read-only, and a way to run the CLI."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import AFFINE, ONE_TEST_SET, make_bids, set_read_only, snapshot

os.environ.setdefault("NIPYPE_NO_ET", "1")


@pytest.fixture
def bids_factory(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Make a read-only BIDS dataset; on teardown check nothing in it changed."""
    made: list[tuple[Path, dict]] = []

    def factory(name: str = "bids", *, prepare: Callable[[Path], None] | None = None, **kwargs) -> Path:
        root = make_bids(tmp_path / name, **kwargs)
        if prepare is not None:
            prepare(root)
        made.append((root, snapshot(root)))
        set_read_only(root)
        return root

    yield factory
    for root, before in made:
        set_read_only(root, False)
        assert snapshot(root) == before, f"bidsdl changed files in BIDS_DIR {root}"


@pytest.fixture(scope="session")
def sample_bids(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real sample dataset (3 participants + a planted duplicate) on 1.5x coarser voxels (the demo and
    the benchmark run the 1 mm ones), read-only for the session."""
    from pipeline.sample.generate import SampleOptions, write_sample_dataset

    root = tmp_path_factory.mktemp("sample") / "bids"
    write_sample_dataset(
        root, SampleOptions(n_subjects=3, seed=5, two_session_fraction=0.4, large_fov_fraction=0.5,
                            duplicate_subject=True, voxel_scale=1.5, n_jobs=2),
    )
    before = snapshot(root)
    set_read_only(root)
    yield root
    set_read_only(root, False)
    assert snapshot(root) == before, "bidsdl changed files in the sample BIDS_DIR"


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``bidsdl`` in this process; returns (exit code, stdout, stderr). A participant run that names no
    ``--registration`` takes the affine path (:data:`tests.helpers.AFFINE`); a group study that names no
    ``--outer-folds`` has one test set (:data:`tests.helpers.ONE_TEST_SET`: the default nests below 300
    participants, a handful of trainings per study)."""
    from pipeline.cli.run import main

    def _run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        argv = [str(a) for a in args]
        if "participant" in argv[2:3] and "--registration" not in argv:
            argv += AFFINE
        if "group" in argv[2:3] and "--target" in argv and "--outer-folds" not in argv:
            argv += ONE_TEST_SET
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture(scope="session")
def sample_run(sample_bids, tmp_path_factory):
    from pipeline.cli.run import main

    out = tmp_path_factory.mktemp("run") / "derivatives"
    codes = {
        "participant": main([str(sample_bids), str(out), "participant", "--nprocs", "2", *AFFINE]),
        "group": main([str(sample_bids), str(out), "group"]),
    }
    return sample_bids, out, codes


#: The session's preprocessed samples, each made once: the test modules that name one run on one pytest-xdist worker.
SHARED_SAMPLES = {
    "learning-sample": ("learning_sample", "trained_package"),
    "sample": ("sample_bids", "sample_run"),
}


@functools.cache
def scope_of(path: str) -> str:
    """The scope a test module runs in under ``--dist loadscope``: the shared sample it names (the first of
    :data:`SHARED_SAMPLES`), else the module itself (its module-scoped fixtures are then made once too).

    >>> scope_of("tests/integration/test_learning.py"), scope_of("tests/unit/test_status.py")
    ('learning-sample', 'tests/unit/test_status.py')
    """
    module = Path(__file__).parents[1] / path
    text = module.read_text() if module.suffix == ".py" and module.name.startswith("test_") else ""
    found = (name for name, fixtures in SHARED_SAMPLES.items() if any(re.search(rf"\b{f}\b", text) for f in fixtures))
    return next(found, path)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make test`` runs two pytest-xdist workers with ``--dist loadscope``: a scope is a test module, or every
    module that names one shared sample (:func:`scope_of`), so that no sample or module fixture is made twice."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedSampleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid.split("::")[0])

    return SharedSampleScheduling(config, log)

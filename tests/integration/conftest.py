"""Session fixtures of the learning and inference tests: one small preprocessed sample, one trained model."""

from __future__ import annotations

import pytest

from tests.helpers import AFFINE, FAST, fresh_output, preprocessed_sample, the_package


@pytest.fixture(scope="session")
def learning_sample(tmp_path_factory):
    """8 participants (4 AD, 4 CN; 2 with two sessions), preprocessed once for the session (the affine path: the
    nonlinear registration's own tests are tests/integration/test_morphometry*.py)."""
    from pipeline.sample.generate import SampleOptions

    options = SampleOptions(n_subjects=8, seed=6, two_session_fraction=0.25, voxel_scale=3, n_jobs=2)
    with preprocessed_sample(tmp_path_factory.mktemp("learning"), options, *AFFINE) as (bids, out, code):
        assert code == 0
        yield bids, out


@pytest.fixture(scope="session")
def trained_package(learning_sample, tmp_path_factory):
    """A model package trained with the FAST configuration on the learning sample."""
    from pipeline.cli.run import main

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path_factory.mktemp("trained") / "derivatives")
    assert main([str(bids), str(out), "group", *FAST]) == 0
    return the_package(out)

"""Shared fixtures."""

from __future__ import annotations

import shutil

import pytest
from explain_fixtures import explain_clips, explain_model_dir, segment_model_dir  # noqa: F401  (session fixtures)


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """Path to a small synthetic corpus (seed 0), generated once per test session (~5-10 s)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from trustser.data.synthetic import synthesize_corpus

    return synthesize_corpus(tmp_path_factory.mktemp("synthetic") / "small", seed=0, size="small", num_proc=2)


# the real-path rehearsal's inputs and runs (tests/rehearsal.py), shared by test_real_path.py and test_readme_usage.py
from rehearsal import iemocap_run, meld_run, rehearsal_inputs  # noqa: E402,F401

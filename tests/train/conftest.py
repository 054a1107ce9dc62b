"""Fixtures for trainer tests: feedback data and one uninterrupted reference run (the tiny
model and the compilation cache come from tests/conftest.py, the plumbing from run_helpers.py)."""

import os

import pytest

from run_helpers import cli_env, run_cli, train_argv, write_feedback


@pytest.fixture(scope="session")
def feedback_file(tmp_path_factory) -> str:
    path = os.path.join(str(tmp_path_factory.mktemp("data")), "feedback.jsonl")
    write_feedback(path, n=80, seed=1)
    return path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_model_dir, feedback_file, compile_cache) -> str:
    """The workdir of one uninterrupted tiny_cpu run on 4 CPU devices (the comparison for
    resumed and multi-process runs)."""
    workdir = str(tmp_path_factory.mktemp("reference_run"))
    run_cli(train_argv(workdir, tiny_model_dir, feedback_file), cli_env(compile_cache))
    return workdir

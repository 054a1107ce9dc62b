"""Fixtures for trainer tests: a tiny random HF Llama with its tokenizer, feedback data,
a shared compilation cache and one uninterrupted reference run (run_helpers.py builds them)."""

import os

import pytest

from run_helpers import cli_env, run_cli, train_argv, write_feedback, write_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """An HF directory (config.json, model.safetensors, tokenizer files) of a tiny Llama."""
    pytest.importorskip("torch")
    return write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def feedback_file(tmp_path_factory) -> str:
    path = os.path.join(str(tmp_path_factory.mktemp("data")), "feedback.jsonl")
    write_feedback(path, n=80, seed=1)
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_model_dir, feedback_file, compile_cache) -> str:
    """The workdir of one uninterrupted tiny_cpu run on 4 CPU devices (the comparison for
    resumed and multi-process runs)."""
    workdir = str(tmp_path_factory.mktemp("reference_run"))
    run_cli(train_argv(workdir, tiny_model_dir, feedback_file), cli_env(compile_cache))
    return workdir

"""Fixtures for online tests: the trainer tests' tiny random Llama, a prompt file, a
shared compilation cache (tests/train/run_helpers.py builds the model)."""

import json
import os
import random
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
sys.path.insert(0, HERE)

from run_helpers import sentence, write_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    pytest.importorskip("torch")
    return write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> str:
    path = os.path.join(str(tmp_path_factory.mktemp("prompts")), "prompts.jsonl")
    rng = random.Random(3)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": sentence(rng, 2, 5) + " ?"}) + "\n")
    return path


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def online_run(tmp_path_factory, tiny_model_dir, prompts_file, compile_cache) -> str:
    """The workdir of one uninterrupted `kto-jax online` run of online_tiny_cpu (2 CPU
    devices), shared by the tests that compare other runs with it."""
    from online_helpers import online_argv, online_env
    from run_helpers import run_cli
    workdir = str(tmp_path_factory.mktemp("online_run"))
    run_cli(online_argv(workdir, tiny_model_dir, prompts_file), online_env(compile_cache))
    return workdir

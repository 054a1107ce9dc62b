"""Fixtures for online tests: a prompt file and one uninterrupted online run (the tiny
random Llama and the compilation cache come from tests/conftest.py)."""

import json
import os
import random
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
sys.path.insert(0, HERE)

from tiny_models import sentence  # noqa: E402


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> str:
    path = os.path.join(str(tmp_path_factory.mktemp("prompts")), "prompts.jsonl")
    rng = random.Random(3)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": sentence(rng, 2, 5) + " ?"}) + "\n")
    return path


@pytest.fixture(scope="session")
def online_run(tmp_path_factory, tiny_model_dir, prompts_file, compile_cache) -> str:
    """The workdir of one uninterrupted `kto-jax online` run of online_tiny_cpu (2 CPU
    devices), shared by the tests that compare other runs with it."""
    from online_helpers import online_argv, online_env
    from run_helpers import run_cli
    workdir = str(tmp_path_factory.mktemp("online_run"))
    run_cli(online_argv(workdir, tiny_model_dir, prompts_file), online_env(compile_cache))
    return workdir

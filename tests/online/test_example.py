"""`kto-jax online --example=DIR` makes what configs/online_tiny_cpu.py needs (no torch, no
hub) and prints the command; that command, run as printed, finishes its two rounds."""

import os
import shlex
import subprocess
import sys

import pytest
from online_helpers import online_env
from run_helpers import REPO
from kto_jax.online.example import distinct_letters
from kto_jax.train.metrics import read_jsonl


def test_the_example_judge():
    assert distinct_letters("q", "") == 0.0
    assert distinct_letters("q", "aAb b!") == 2 / 8
    assert distinct_letters("q", "the quick brown fox") == 1.0


@pytest.mark.slow
def test_the_printed_command_runs_the_tiny_online_config(compile_cache, tmp_path):
    env = online_env(compile_cache)
    made = subprocess.run([sys.executable, "-m", "kto_jax.cli", "online", f"--example={tmp_path}"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    command = next(line.strip() for line in made.stdout.splitlines()
                   if line.strip().startswith("kto-jax online --config="))
    argv = shlex.split(command)
    assert "--config=configs/online_tiny_cpu.py" in argv       # printed from the checkout's root
    run = subprocess.run([sys.executable, "-m", "kto_jax.cli", *argv[1:]], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    workdir = os.path.join(str(tmp_path), "run")
    rounds = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("kind") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert os.path.isfile(os.path.join(workdir, "online.png"))
    assert "auto_weights" not in run.stderr        # never offered where it is refused

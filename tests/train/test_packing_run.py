"""`kto-jax train` with data.packing=True on tiny_cpu (4 CPU devices, 4 packing groups):
the logged train and eval metrics equal the padded reference run's, a SIGKILLed packed run
resumes bit for bit (issue 13 item 4; two packed processes: tests/train/test_multiprocess.py)."""

import os

import pytest

from run_helpers import (PACKING, assert_metrics_like, cli_env, kill_after_checkpoint, metrics, run_cli,
                         train_argv)
from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tiny_model_dir, feedback_file, compile_cache) -> str:
    workdir = str(tmp_path_factory.mktemp("packed_run"))
    run_cli(train_argv(workdir, tiny_model_dir, feedback_file, *PACKING), cli_env(compile_cache))
    return workdir


def test_packed_run_logs_the_padded_runsmetrics(packed_run, reference_run):
    assert_metrics_like(packed_run, reference_run, logs=("metrics.jsonl", "eval_metrics.jsonl"),
                        first_step_accuracy=False)


def test_sigkill_then_resume_of_a_packed_run_is_bitwise(packed_run, tiny_model_dir, feedback_file,
                                                        compile_cache, tmp_path):
    workdir = str(tmp_path / "killed")
    argv = train_argv(workdir, tiny_model_dir, feedback_file, *PACKING)
    env = cli_env(compile_cache)
    kill_after_checkpoint(argv, env, workdir)
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) < len(metrics(packed_run))
    assert "resuming from step" in run_cli(argv, env).stderr
    assert metrics(workdir) == metrics(packed_run)
    assert metrics(workdir, "eval_metrics.jsonl") == metrics(packed_run, "eval_metrics.jsonl")

"""Two CPU processes x 2 devices on localhost (gloo) train like one process x 4 devices.

Each process reads only its rows of every microbatch; `jax.distributed.initialize`
gets the coordinator from the KTO_JAX_* variables the launch scripts set. The loss
curve (and every other logged metric) must match the single-process reference run;
only the order of cross-process float reductions may differ. Rewards and KL are
differences of float32 sequence log-probs of magnitude ~60, whose ulp is ~4e-6, hence
an absolute tolerance of 2e-5 (counts and token totals must match exactly).
With data.packing (issue 13) each process packs its own rows, and the KL completion
of its last example is the next process's first (the global roll): the two packed
processes log the padded single-process run's metrics, train and eval.
"""

import os

import pytest

from run_helpers import NUM_STEPS, PACKING, assert_metrics_like, run_two_processes, train_argv
from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_two_processes_match_one_process(reference_run, tiny_model_dir, feedback_file,
                                         compile_cache, tmp_path, packed):
    workdir = str(tmp_path / "two_processes")
    extra = PACKING if packed else ()
    run_two_processes(train_argv(workdir, tiny_model_dir, feedback_file, *extra), compile_cache)

    assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == list(
        range(1, NUM_STEPS + 1))
    assert_metrics_like(workdir, reference_run, first_step_accuracy=not packed,
                        logs=("metrics.jsonl", "eval_metrics.jsonl") if packed else
                        ("metrics.jsonl",))
    assert os.path.exists(os.path.join(workdir, "hf", "config.json"))  # written once, by process 0

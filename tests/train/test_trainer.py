"""`kto-jax train` end to end on tiny_cpu: outputs, export, SIGKILL resume, SIGTERM.

Every run is a real `python -m kto_jax.cli` subprocess on 4 CPU devices; they share a
persistent compilation cache, so only the first one pays for XLA compiles.
"""

import glob
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from run_helpers import (NUM_STEPS, REPO, cli_env, committed_steps, kill_after_checkpoint, metrics,
                         run_cli, tensors, train_argv, wait_for)
from kto_jax.train.metrics import REQUIRED_KEYS, read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier


def test_run_writes_metrics_tensorboard_checkpoints_and_export(reference_run):
    lines = read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
    assert [r["step"] for r in lines] == list(range(1, NUM_STEPS + 1))
    for record in lines:
        assert set(REQUIRED_KEYS) <= set(record)
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        assert record["tokens_per_s"] > 0 and record["mfu"] == 0.0  # CPU: no peak, mfu 0
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["rewards/margins"] > 0  # desirable rewards pulled above undesirable
    evals = read_jsonl(os.path.join(reference_run, "eval_metrics.jsonl"))
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    assert all(math.isfinite(r["loss"]) and "rewards/margins" in r for r in evals)
    assert glob.glob(os.path.join(reference_run, "tb", "events.out.tfevents.*"))
    assert committed_steps(reference_run) == [10, 12]  # every 2 steps, keep 2

    transformers = pytest.importorskip("transformers")
    hf = os.path.join(reference_run, "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    ids = tokenizer("the cat sat ?", return_tensors="pt").input_ids
    assert np.isfinite(model(ids).logits.detach().numpy()).all()


def test_export_command_writes_the_same_weights(reference_run, compile_cache, tmp_path):
    out = str(tmp_path / "exported")
    proc = run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", reference_run,
                    "--out", out, "--step", str(NUM_STEPS)], cli_env(compile_cache))
    assert f"exported step {NUM_STEPS}" in proc.stdout
    a, b = tensors(out), tensors(os.path.join(reference_run, "hf"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_sigkill_then_resume_gives_bitwise_identical_metrics_and_rerun_is_a_no_op(
        reference_run, tiny_model_dir, feedback_file, compile_cache, tmp_path):
    workdir = str(tmp_path / "killed")
    argv = train_argv(workdir, tiny_model_dir, feedback_file)
    env = cli_env(compile_cache)
    kill_after_checkpoint(argv, env, workdir)
    killed_at = len(read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    assert killed_at < NUM_STEPS and not os.path.exists(os.path.join(workdir, "hf"))

    proc = run_cli(argv, env)
    assert "resuming from step" in proc.stderr
    assert metrics(workdir) == metrics(reference_run)
    assert metrics(workdir, "eval_metrics.jsonl") == metrics(reference_run, "eval_metrics.jsonl")
    a, b = tensors(os.path.join(workdir, "hf")), tensors(os.path.join(reference_run, "hf"))
    assert all(np.array_equal(a[k], b[k]) for k in b)

    before = os.path.getmtime(os.path.join(workdir, "hf", "config.json"))
    proc = run_cli(argv, env)  # the same command on a finished run: nothing new
    assert f"resuming from step {NUM_STEPS}" in proc.stderr
    assert metrics(workdir) == metrics(reference_run)
    assert os.path.getmtime(os.path.join(workdir, "hf", "config.json")) == before


def test_sigterm_saves_a_checkpoint_and_exits_0(tiny_model_dir, feedback_file, compile_cache,
                                                 tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = subprocess.Popen(train_argv(workdir, tiny_model_dir, feedback_file),
                            env=cli_env(compile_cache), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: read_jsonl(os.path.join(workdir, "metrics.jsonl")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in err
    last_logged = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"]
    assert last_logged < NUM_STEPS
    assert committed_steps(workdir)[-1] == last_logged  # the step it stopped after


def test_bco_state_and_a_synced_reference_resume_bit_for_bit(tiny_model_dir, feedback_file,
                                                             compile_cache, tmp_path):
    """bco's running reward mean (the train state's loss_state) and a TR-DPO-synced reference
    (reference.sync_every=1: it differs from the initial policy at every checkpoint) are checkpointed: SIGKILL after the first checkpoint, then
    resume, gives the uninterrupted run's metrics (bco/delta included) and weights exactly."""
    extra = ("--config.loss.name=bco", "--config.reference.sync_every=1",
             "--config.reference.sync_alpha=0.5")
    env = cli_env(compile_cache)
    whole = str(tmp_path / "whole")
    run_cli(train_argv(whole, tiny_model_dir, feedback_file, *extra), env)
    lines = metrics(whole)
    assert all(math.isfinite(r["bco/delta"]) for r in lines)
    assert len({r["bco/delta"] for r in lines}) > 1            # the running mean moves
    workdir = str(tmp_path / "killed")
    argv = train_argv(workdir, tiny_model_dir, feedback_file, *extra)
    # the first steps warm up from lr 0: wait for a checkpoint after the policy has moved
    kill_after_checkpoint(argv, env, workdir, min_step=4)
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) < NUM_STEPS
    proc = run_cli(argv, env)
    resumed_at = int(proc.stderr.split("resuming from step ")[1].split()[0])
    assert 4 <= resumed_at < NUM_STEPS
    assert metrics(workdir) == lines
    assert metrics(workdir, "eval_metrics.jsonl") == metrics(whole, "eval_metrics.jsonl")
    a, b = tensors(os.path.join(workdir, "hf")), tensors(os.path.join(whole, "hf"))
    assert all(np.array_equal(a[k], b[k]) for k in b)

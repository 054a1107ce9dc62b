"""Faults a user meets on a workdir, through the real `kto-jax` CLI: a damaged newest
checkpoint (train and export fall back to the previous one), a full disk, a second run on
the same workdir, a stale lock, and a resume with changed settings. Each asserts the one
message, the exit code and that nothing was lost."""

import glob
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from run_helpers import NUM_STEPS, REPO, cli_env, metrics, tensors, train_argv
from kto_jax.train.metrics import read_jsonl
from kto_jax.train.workdir import LOCK_FILE

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier


def _run(argv, env, timeout=600):
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _copy_run(reference_run, tmp_path, name="run"):
    """A finished run's workdir without its export: re-running it resumes from a checkpoint."""
    workdir = str(tmp_path / name)
    shutil.copytree(reference_run, workdir)
    shutil.rmtree(os.path.join(workdir, "hf"))
    os.remove(os.path.join(workdir, "hf.step"))
    return workdir


def _truncate_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)


def _warnings(stderr):
    return [line for line in stderr.splitlines() if "cannot be restored" in line]


def test_train_sets_aside_a_truncated_newest_checkpoint_and_resumes_from_the_previous(
        reference_run, tiny_model_dir, feedback_file, compile_cache, tmp_path):
    workdir = _copy_run(reference_run, tmp_path)
    ckpts = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    newest, previous = steps[-1], steps[-2]
    _truncate_array_file(os.path.join(ckpts, str(newest)))
    proc = _run(train_argv(workdir, tiny_model_dir, feedback_file), cli_env(compile_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _warnings(proc.stderr)
    assert len(lines) == 1 and f"{ckpts}/{newest} cannot be restored" in lines[0]
    assert "Traceback" not in proc.stderr and "TensorStore({" not in proc.stderr
    assert f"resuming from step {previous}" in proc.stderr
    moved = glob.glob(os.path.join(ckpts, f"{newest}.corrupt-*"))
    assert len(moved) == 1 and moved[0] in lines[0]  # renamed, not deleted
    # Nothing lost: the resumed run recomputes the lost steps bit for bit.
    a, b = tensors(os.path.join(workdir, "hf")), tensors(os.path.join(reference_run, "hf"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
    assert metrics(workdir) == metrics(reference_run)


def test_export_falls_back_when_the_newest_checkpoint_lost_its_metadata(
        reference_run, compile_cache, tmp_path):
    workdir = _copy_run(reference_run, tmp_path)
    ckpts = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    os.remove(os.path.join(ckpts, str(steps[-1]), "state", "_METADATA"))
    out = str(tmp_path / "exported")
    proc = _run([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", workdir, "--out", out],
                cli_env(compile_cache, devices=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _warnings(proc.stderr)
    assert len(lines) == 1 and f"{ckpts}/{steps[-1]} cannot be restored" in lines[0]
    assert "_METADATA" in lines[0] and "Traceback" not in proc.stderr
    assert f"exported step {steps[-2]}" in proc.stdout
    assert glob.glob(os.path.join(ckpts, f"{steps[-1]}.corrupt-*"))
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_disk_full_stops_training_with_one_message(tiny_model_dir, feedback_file, compile_cache,
                                                   tmp_path):
    mount = str(tmp_path / "small")
    os.makedirs(mount)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", mount],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}): needs root")
    try:
        workdir = os.path.join(mount, "run")
        proc = _run(train_argv(workdir, tiny_model_dir, feedback_file), cli_env(compile_cache))
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("kto-jax train: error")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "cannot save the checkpoint of step 2" in errors[0] and "disk full" in errors[0]
        assert os.path.join(workdir, "checkpoints") in errors[0] and "needs about" in errors[0]
        assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr
        assert "warning: " in proc.stderr and "each needs" in proc.stderr  # the free-space warning
        left = os.listdir(os.path.join(workdir, "checkpoints"))
        assert not [d for d in left if "tmp" in d], left
        assert read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"] <= 4  # stopped at once
        assert not os.path.exists(os.path.join(workdir, LOCK_FILE))
    finally:
        subprocess.run(["umount", mount], check=False)


def _write_lock(workdir, pid):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "w", encoding="utf-8") as f:
        f.write('{"host": "%s", "pid": %d, "started": "2024-01-01 00:00:00"}\n'
                % (socket.gethostname(), pid))


def test_a_second_run_on_a_locked_workdir_exits_2(tiny_model_dir, feedback_file, compile_cache,
                                                  tmp_path):
    workdir = str(tmp_path / "locked")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _write_lock(workdir, holder.pid)
        proc = _run(train_argv(workdir, tiny_model_dir, feedback_file), cli_env(compile_cache))
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"kto-jax train: error: workdir {workdir} is in use by another run (PID {holder.pid} on host")
    assert "Traceback" not in proc.stderr
    assert os.listdir(workdir) == [LOCK_FILE]  # the other run's lock is left alone


def test_resume_refuses_a_changed_loss_unless_allowed_and_takes_over_a_stale_lock(
        reference_run, tiny_model_dir, feedback_file, compile_cache, tmp_path):
    workdir = str(tmp_path / "finished")
    shutil.copytree(reference_run, workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    env = cli_env(compile_cache)
    proc = _run(train_argv(workdir, tiny_model_dir, feedback_file, "--config.loss.beta=0.2",
                           "--config.optim.lr=0.002"), env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "loss.beta: 0.1 -> 0.2" in last and "optim.lr: 0.001 -> 0.002" in last
    assert "allow_config_change=True" in last and "Traceback" not in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(workdir, dead.pid)  # left by a run that died
    proc = _run(train_argv(workdir, tiny_model_dir, feedback_file, "--config.train.log_every=3",
                           "--config.checkpoint.keep=5"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the stale workdir lock {os.path.join(workdir, LOCK_FILE)}" in proc.stderr
    assert "train.log_every: 1 -> 3" in proc.stderr  # a free change: a warning only
    assert f"resuming from step {NUM_STEPS}" in proc.stderr
    assert not os.path.exists(os.path.join(workdir, LOCK_FILE))

    proc = _run(train_argv(workdir, tiny_model_dir, feedback_file, "--config.loss.beta=0.2",
                           "--config.train.allow_config_change=True"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss.beta: 0.1 -> 0.2" in proc.stderr

"""Helpers for trainer tests: the feedback writer, `kto-jax train` runs and their comparisons.

The model they train is tests/tiny_models.py's (the `tiny_model_dir` fixture of
tests/conftest.py), saved with `save_pretrained`, which is what `--config.model.path`
of configs/tiny_cpu.py expects.
"""

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

from cli_runs import REPO, cli_env, run_cli  # noqa: F401  (trainer tests import them from here)
from tiny_models import sentence


def write_feedback(path: str, n: int, seed: int) -> None:
    """Unpaired feedback rows {prompt, completion, label}, both classes well mixed."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"prompt": sentence(rng, 2, 6) + " ?", "completion": sentence(rng, 2, 8),
                   "label": bool(i % 3)}
            f.write(json.dumps(row) + "\n")


# ---- running `kto-jax train` in subprocesses (tests/cli_runs.py) ----

TINY_CONFIG = os.path.join(REPO, "configs", "tiny_cpu.py")
NUM_STEPS = 12  # long enough that a kill after the first checkpoint lands mid-run


def train_argv(workdir: str, model_dir: str, data_file: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kto_jax.cli", "train", f"--config={TINY_CONFIG}",
            f"--workdir={workdir}", f"--config.model.path={model_dir}",
            f"--config.data.train_path={data_file}", f"--config.train.num_steps={NUM_STEPS}",
            *extra]


PACKING = ("--config.data.packing=True", "--config.data.pack_length=128")


def assert_metrics_like(workdir: str, reference_run: str, *, logs=("metrics.jsonl",),
                        first_step_accuracy: bool = True) -> None:
    """Every logged value of `workdir` equals the reference run's: counts and token totals
    exactly, floats within float32 rounding (rewards and KL are differences of log-probs of
    magnitude ~60, ulp ~4e-6: atol 2e-5). `first_step_accuracy=False` skips rewards/accuracies
    at step 1, where pi = pi_ref and the rewards are 0 up to rounding, whose sign another
    program (the packed forward) may flip."""
    from kto_jax.train.metrics import TIMING_KEYS, read_jsonl
    import numpy as np
    for log in logs:
        ours, theirs = (read_jsonl(os.path.join(w, log)) for w in (workdir, reference_run))
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] and ours
        for i, (mine, ref) in enumerate(zip(ours, theirs)):
            for key, value in ref.items():
                if key in TIMING_KEYS or value is None or (
                        not first_step_accuracy and i == 0 and log == "metrics.jsonl"
                        and key.endswith("accuracies")):
                    continue
                np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=2e-5,
                                           err_msg=f"{log} step {ref['step']} {key}")


def metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict]:
    """A run's logged lines without the timing fields (which differ between runs)."""
    from kto_jax.train.metrics import TIMING_KEYS, read_jsonl
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_jsonl(os.path.join(workdir, name))]


def tensors(hf_dir: str) -> dict:
    """Every tensor of an HF directory's safetensors files, by name."""
    from safetensors.numpy import load_file
    out = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        out.update(load_file(path))
    return out


def committed_steps(workdir: str) -> list[int]:
    """Checkpoint steps whose directories Orbax has finished (renamed from their tmp name)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def wait_for(predicate, proc: subprocess.Popen, stderr_of=lambda: "", timeout: float = 600.0,
             poll: float = 0.01) -> None:
    """Waits until predicate() holds; fails with the process's stderr if it ends first."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {stderr_of()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(poll)


def kill_after_checkpoint(argv: list[str], env: dict, workdir: str, min_step: int = 1,
                          committed=committed_steps, poll: float = 0.01) -> None:
    """Starts `argv` (a `kto-jax train`) and SIGKILLs it as soon as `committed(workdir)` holds
    a checkpoint of step >= min_step: the crash the resume tests recover from. Its stderr
    goes to a file (a pipe nobody reads could fill up and stall the run)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)

        def stderr_of() -> str:
            log.seek(0)
            return log.read()
        try:
            wait_for(lambda: any(s >= min_step for s in committed(workdir)), proc, stderr_of,
                     poll=poll)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def run_two_processes(argv: list[str], compile_cache: str, timeout: float = 900) -> None:
    """Runs `argv` (a `kto-jax train`) as two processes of 2 CPU devices each, joined over
    localhost (a free port): the multi-host run the 2-processes-equal-1 tests compare."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True,
                              env=cli_env(compile_cache, devices=2,
                                          KTO_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                          KTO_JAX_NUM_PROCESSES="2", KTO_JAX_PROCESS_ID=str(rank)))
             for rank in range(2)]
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"process {rank}: {err[-3000:]}"


def assert_resume_is_bitwise(argv: list[str], env: dict, workdir: str, reference_run: str) -> None:
    """SIGKILLs `argv` after its first checkpoint, reruns it, and checks that the resumed run
    logs the uninterrupted `reference_run`'s metrics and exports the same tensors, bit for bit."""
    import numpy as np
    from kto_jax.train.metrics import read_jsonl
    kill_after_checkpoint(argv, env, workdir)
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) < len(metrics(reference_run))
    assert "resuming from step" in run_cli(argv, env).stderr
    assert metrics(workdir) == metrics(reference_run)
    a, b = tensors(os.path.join(workdir, "hf")), tensors(os.path.join(reference_run, "hf"))
    assert all(np.array_equal(a[k], b[k]) for k in b)

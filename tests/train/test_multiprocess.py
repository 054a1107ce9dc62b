"""Two CPU processes x 2 devices on localhost (gloo) train like one process x 4 devices.

Each process reads only its rows of every microbatch; `jax.distributed.initialize`
gets the coordinator from the KTO_JAX_* variables the launch scripts set. The loss
curve (and every other logged metric) must match the single-process reference run;
only the order of cross-process float reductions may differ. Rewards and KL are
differences of float32 sequence log-probs of magnitude ~60, whose ulp is ~4e-6, hence
an absolute tolerance of 2e-5 (counts and token totals must match exactly).
"""

import os
import socket
import subprocess

import numpy as np

from run_helpers import NUM_STEPS, REPO, cli_env, train_argv
from kto_jax.train.metrics import TIMING_KEYS, read_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(reference_run, tiny_model_dir, feedback_file,
                                         compile_cache, tmp_path):
    workdir = str(tmp_path / "two_processes")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = cli_env(compile_cache, devices=2, KTO_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      KTO_JAX_NUM_PROCESSES="2", KTO_JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen(train_argv(workdir, tiny_model_dir, feedback_file), env=env,
                                      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"process {rank}: {err[-3000:]}"

    ours = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    reference = read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
    assert [r["step"] for r in ours] == list(range(1, NUM_STEPS + 1))
    for mine, ref in zip(ours, reference):
        for key, value in ref.items():
            if key in TIMING_KEYS or value is None:
                continue
            np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=2e-5,
                                       err_msg=f"step {ref['step']} {key}")
    assert os.path.exists(os.path.join(workdir, "hf", "config.json"))  # written once, by process 0

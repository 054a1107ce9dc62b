"""`kto-jax online` end to end on online_tiny_cpu: round files, metrics with a `round`
key, the plot, and a run SIGKILLed twice (before and after its first checkpoint) that
resumes to the uninterrupted run's samples, labels, metrics and final weights."""

import glob
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from online_helpers import online_argv, online_env
from run_helpers import run_cli

from kto_jax.train.metrics import TIMING_KEYS, read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier

ROUNDS, STEPS_PER_ROUND = 2, 2


@pytest.fixture()
def uninterrupted(online_run) -> str:
    return online_run


def _rows(workdir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def _weights(workdir: str) -> dict:
    from safetensors.numpy import load_file
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "hf", "*.safetensors"))):
        out.update(load_file(path))
    assert out, f"no exported weights in {workdir}/hf"
    return out


def _round_files(workdir: str) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(os.path.join(workdir, "rounds")):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, workdir)] = open(path, encoding="utf-8").read()
    return out


def test_rounds_write_their_files_metrics_and_plot(uninterrupted, prompts_file):
    rows = _rows(uninterrupted)
    round_rows = [r for r in rows if r["kind"] == "round"]
    assert [r["round"] for r in round_rows] == [0, 1, 2]
    assert [r["step"] for r in round_rows] == [0, STEPS_PER_ROUND, 2 * STEPS_PER_ROUND]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [(r["step"], r["round"]) for r in train_rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert round_rows[0]["kl_ref"] == 0.0          # the initial policy is the reference
    assert round_rows[-1]["kl_ref"] > 0.0          # and it moved
    assert train_rows[0]["kl"] == 0.0 and train_rows[2]["kl"] > 0.0  # round 2 keeps pi_ref
    # 8 prompts, heldout_fraction 0.25: 6 train prompts x 4 samples, 2 held-out x 4
    for r in (1, 2):
        samples = read_jsonl(os.path.join(uninterrupted, "rounds", f"{r:04d}", "samples.jsonl"))
        assert len(samples) == 24 and {s["round"] for s in samples} == {r}
        from online_judge import score
        for s in samples:  # verdicts are the judge's, labels the threshold's
            assert s["score"] == score(s["prompt"], s["completion"])
            assert s["label"] == (s["score"] > 0.5)
        passed = sum(s["label"] for s in samples)
        assert round_rows[r]["judge/train_pass_rate"] == pytest.approx(passed / 24)
        assert round_rows[r]["examples/desirable"] == passed
        examples = read_jsonl(os.path.join(uninterrupted, "rounds", f"{r:04d}", "examples.jsonl"))
        assert [(e["completion"], e["label"]) for e in examples] == \
            [(s["completion"], s["label"]) for s in samples]
    heldout = read_jsonl(os.path.join(uninterrupted, "rounds", "0002", "heldout.jsonl"))
    assert len(heldout) == 8
    assert round_rows[2]["judge/pass_rate"] == pytest.approx(sum(h["pass"] for h in heldout) / 8)
    assert round_rows[2]["judge/pass_rate_low"] <= round_rows[2]["judge/pass_rate"] <= \
        round_rows[2]["judge/pass_rate_high"]
    assert os.path.getsize(os.path.join(uninterrupted, "online.png")) > 1000
    assert os.listdir(os.path.join(uninterrupted, "tb"))
    assert _weights(uninterrupted)


def _kill_when(argv, env, ready, timeout=300.0) -> None:
    """Starts argv, SIGKILLs it as soon as ready() holds (fails if it ends first)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=env["PYTHONPATH"].split(os.pathsep)[0])
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_twice_then_resume_reproduces_the_uninterrupted_run(
        uninterrupted, tmp_path, tiny_model_dir, prompts_file, compile_cache):
    workdir = str(tmp_path / "killed")
    argv = online_argv(workdir, tiny_model_dir, prompts_file)
    env = online_env(compile_cache)
    ckpt = os.path.join(workdir, "checkpoints")

    # 1: during round 1, once its samples are on disk and before any checkpoint
    _kill_when(argv, env, lambda: os.path.exists(os.path.join(workdir, "rounds", "0001",
                                                              "samples.jsonl")))
    assert not os.path.isdir(ckpt) or not [d for d in os.listdir(ckpt) if d.isdigit()]
    # 2: after round 1's checkpoint, as round 2 trains
    _kill_when(argv, env, lambda: os.path.isdir(os.path.join(ckpt, str(STEPS_PER_ROUND))) and
               os.path.exists(os.path.join(workdir, "rounds", "0002", "examples.jsonl")))
    assert not os.path.exists(os.path.join(workdir, "hf"))
    proc = run_cli(argv, env)
    assert "resuming after round 1" in proc.stderr

    assert _round_files(workdir) == _round_files(uninterrupted)   # same samples, verdicts, labels
    assert _rows(workdir) == _rows(uninterrupted)                   # same metrics, once each
    ours, theirs = _weights(workdir), _weights(uninterrupted)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # a finished run re-run does nothing new
    run_cli(argv, env)
    assert _rows(workdir) == _rows(uninterrupted)


def test_refresh_reference_restarts_every_round_at_the_policy(tmp_path, tiny_model_dir,
                                                             prompts_file, compile_cache):
    """online.reference="refresh": each round's first step sees pi_ref == pi, so its
    rewards and KL are exactly 0; with "initial" (the run above) round 2's are not."""
    workdir = str(tmp_path / "refresh")
    run_cli(online_argv(workdir, tiny_model_dir, prompts_file,
                        "--config.online.reference=refresh"), online_env(compile_cache))
    firsts = [r for r in _rows(workdir) if r["kind"] == "train" and r["step"] in (1, 3)]
    assert len(firsts) == 2
    for row in firsts:
        assert row["kl"] == 0.0
        assert row["rewards/desirable"] == 0.0 and row["rewards/undesirable"] == 0.0
    last = [r for r in _rows(workdir) if r["kind"] == "round"][-1]
    assert last["kl_ref"] > 0.0  # the drift of round 2 alone

"""`kto-jax online` with the HTTP judge (a local server, 127.0.0.1): a judge that keeps
failing stops the run with a clear error after the last round's checkpoint and the
verdicts received are saved; a rerun asks the judge only for the missing ones and
finishes the run."""

import os
import subprocess

import pytest
from judge_server import JudgeServer, verdict_of
from online_helpers import online_argv, online_env
from run_helpers import run_cli

from kto_jax.train.metrics import read_jsonl

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier


def test_failing_judge_stops_after_saving_and_a_rerun_resumes(tmp_path, tiny_model_dir,
                                                            prompts_file, compile_cache):
    workdir = str(tmp_path / "run")
    argv = online_argv(workdir, tiny_model_dir, prompts_file, "--config.online.judge=http",
                       "--config.online.judge_retries=1", "--config.online.judge_timeout=5",
                       "--config.online.judge_workers=3")

    def env(server):
        return online_env(compile_cache, KTO_JAX_JUDGE_BASE_URL=server.url,
                          KTO_JAX_JUDGE_MODEL="test-judge", NO_PROXY="127.0.0.1")

    # judge calls: 1 round 0 held-out, 2 round 1 samples, 3 round 1 held-out, 4 round 2
    # samples: there, every odd request fails for good
    def faults(request_id, attempt):
        call, index = map(int, request_id.split("-"))
        return "fatal" if call == 4 and index % 2 else "ok"

    with JudgeServer(faults) as server:
        proc = subprocess.run(argv, env=env(server), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kto-jax online: error: judge http:test-judge") and "keeps failing" in last
    assert "re-run the same command" in last
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))          # round 1 saved
    round2 = os.path.join(workdir, "rounds", "0002")
    partial = read_jsonl(os.path.join(round2, "verdicts.partial.jsonl"))
    assert partial and all(r["score"] in (0.0, 1.0) for r in partial)
    assert not os.path.exists(os.path.join(round2, "samples.jsonl"))

    with JudgeServer() as server:
        run_cli(argv, env(server))
        first_call = [rid for rid in server.attempts if rid.startswith("1-")]
    assert len(first_call) == 24 - len(partial)   # only the verdicts it did not have
    samples = read_jsonl(os.path.join(round2, "samples.jsonl"))
    assert len(samples) == 24
    saved = {(r["prompt_id"], r["sample"]): r["score"] for r in partial}
    for s in samples:
        expected = 1.0 if verdict_of(s["completion"]) == "YES" else 0.0
        assert s["score"] == saved.get((s["prompt_id"], s["sample"]), expected)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["round"] for r in rows if r["kind"] == "round"] == [0, 1, 2]

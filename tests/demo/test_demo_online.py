"""`kto-jax demo --online --size quick` on a tiny random chat model: the offline demo's
judge-call and optimizer-step budget spent in online rounds. The demos run as `kto-jax`
subprocesses on 8 CPU devices (tests/cli_runs.py), not in the pytest process."""

import json
import os

import pytest

from cli_runs import cli_env, kto_jax, run_cli
from kto_jax.demo import pipeline, rule
from kto_jax.train.metrics import read_jsonl


@pytest.mark.slow
def test_demo_online_quick_keeps_the_offline_budget(tiny_dir, compile_cache, tmp_path):
    workdir = str(tmp_path / "demo")
    printed = run_cli(kto_jax("demo", "--online", "--size", "quick", "--model", tiny_dir,
                              "--workdir", workdir), cli_env(compile_cache, devices=8)).stdout
    assert "the same as: kto-jax online --config=" in printed
    size = pipeline.SIZES["quick"]
    offline_calls = (size.train_prompts * size.samples_per_prompt
                     + 2 * size.heldout_prompts * size.heldout_samples)
    results = json.load(open(os.path.join(workdir, "online_results.json")))
    assert (results["judge_calls"], results["steps"]) == (offline_calls, size.num_steps)
    run = os.path.join(workdir, "online")
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert max(r["step"] for r in rows) == size.num_steps
    held = [r for r in rows if r["kind"] == "round" and "judge/pass_rate" in r]
    assert [r["round"] for r in held] == [0, 2]       # before and after only, as offline
    after = read_jsonl(os.path.join(run, "rounds", "0002", "heldout.jsonl"))
    assert len(after) == size.heldout_prompts * size.heldout_samples == results["n"]
    assert results["pass_rate_after"][0] == sum(rule.passes(s["completion"]) for s in after) / len(after)
    assert all(s["score"] == float(rule.passes(s["completion"])) for s in after)


@pytest.mark.slow
def test_demo_online_lora_trains_adapters_in_the_rounds(tiny_dir, compile_cache, tmp_path):
    """--online --lora: the rounds train rank-R adapters (checkpoints hold only them) and
    the results record the rank; the budget is the offline demo's as above."""
    workdir = str(tmp_path / "demo_lora")
    run_cli(kto_jax("demo", "--online", "--lora=4", "--size", "quick", "--model", tiny_dir,
                    "--workdir", workdir), cli_env(compile_cache, devices=8))
    results = json.load(open(os.path.join(workdir, "online_results.json")))
    assert results["lora_rank"] == 4 and results["steps"] == pipeline.SIZES["quick"].num_steps
    run = os.path.join(workdir, "online")
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["lora"]["rank"] == 4 and config["optim"]["lr"] == pytest.approx(
        pipeline.SIZES["quick"].lr * pipeline.LORA_LR_FACTOR)
    checkpoints = os.path.join(run, "checkpoints")
    last = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    with open(os.path.join(checkpoints, str(last), "state", "_METADATA"), encoding="utf-8") as f:
        saved = [k for k in json.load(f)["tree_metadata"] if k.endswith("'value')")]
    assert saved and all("_lora_" in k for k in saved)

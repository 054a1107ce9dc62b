"""`kto-jax demo --size quick` on a tiny random chat model (the CI smoke test), and the rule.

The demos run as `kto-jax` subprocesses on 8 CPU devices (tests/cli_runs.py), so no trainer
runs inside the pytest process; only the refusals, which stop before any model is loaded,
run in-process."""

import json
import os

import pytest

from cli_runs import cli_env, kto_jax, run_cli
from kto_jax import cli
from kto_jax.demo import pipeline, rule


@pytest.mark.parametrize("text,ok", [
    ("Photosynthesis turns light into sugar. It happens in leaves.", True),
    ("Ah, gravity.", False),                                    # too short to be an answer
    ("The answer to that question lies within the science at the source of the product "
     "and its many parts.", False),                             # 19 words
    ("Bees make honey from nectar", False),                     # the sentence never ends
    ("Bees make honey from nectar\nThey store it.", True),      # a line break ends it
    ("  Yes! Cats purr when content.", False),                  # "Yes!" is one word
])
def test_rule(text, ok):
    assert rule.passes(text) is ok
    assert rule.score("any prompt", text) == float(ok)


def test_bundled_prompts_are_disjoint():
    train = pipeline.bundled_prompts("train", 1000)
    heldout = pipeline.bundled_prompts("heldout", 1000)
    assert (len(train), len(heldout)) == (80, 32)
    assert not set(train) & set(heldout)


@pytest.mark.slow
def test_demo_quick_on_a_tiny_model(tiny_dir, compile_cache, tmp_path):
    workdir = str(tmp_path / "demo")
    printed = run_cli(kto_jax("demo", "--size", "quick", "--model", tiny_dir, "--workdir", workdir),
                      cli_env(compile_cache, devices=8)).stdout
    for phase in ("== 0/4", "== 1/4", "== 2/4", "== 3/4", "== 4/4"):
        assert phase in printed
    assert "judge pass rate, held-out (90% CI)" in printed and "What it does not show" in printed
    assert "the same as: kto-jax train --config=" in printed
    size = pipeline.SIZES["quick"]
    results = json.load(open(os.path.join(workdir, "results.json")))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "feedback_heldout.jsonl"))]
    assert len(rows) == size.heldout_prompts * size.heldout_samples == results["pass_rate_before"]["n"]
    assert [r["label"] for r in rows] == [rule.passes(h["before"]) for h in results["heldout"]]
    assert results["pass_rate_before"]["successes"] == sum(r["label"] for r in rows)
    assert results["pass_rate_after"]["successes"] == sum(rule.passes(h["after"]) for h in results["heldout"])
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "run", "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == list(range(1, size.num_steps + 1))
    assert results["heldout_eval"]["step"] == size.num_steps
    assert os.path.isfile(os.path.join(workdir, "run", "hf", "config.json"))
    assert not os.path.exists(os.path.join(workdir, "run", "checkpoints"))  # only what a user reads
    assert f"Workdir {workdir}, " in printed and " on disk: results.json" in printed
    assert os.path.getsize(os.path.join(workdir, "training_curves.png")) > 10_000
    # A second demo into the same workdir is refused instead of mixing runs.
    assert cli.main(["demo", "--size", "quick", "--model", tiny_dir, "--workdir", workdir]) == 2


@pytest.mark.slow
def test_demo_lora_trains_adapters_of_the_given_rank(tiny_dir, compile_cache, tmp_path):
    """`kto-jax demo --lora=4` (quick size): the run trains rank-4 adapters at 10x the rate, its
    checkpointed config says so, and the aligned policy is the merged export."""
    workdir = str(tmp_path / "demo_lora")
    printed = run_cli(kto_jax("demo", "--size", "quick", "--model", tiny_dir, "--workdir", workdir,
                              "--lora=4"), cli_env(compile_cache, devices=8)).stdout
    size = pipeline.SIZES["quick"]
    assert "(LoRA rank 4 adapters)" in printed and "--config.lora.rank=4" in printed
    assert f"--config.optim.lr={size.lr * pipeline.LORA_LR_FACTOR}" in printed
    config = json.load(open(os.path.join(workdir, "run", "config.json")))
    assert config["lora"]["rank"] == 4 and config["optim"]["lr"] == size.lr * pipeline.LORA_LR_FACTOR
    assert json.load(open(os.path.join(workdir, "results.json")))["lora_rank"] == 4
    assert os.path.isfile(os.path.join(workdir, "run", "hf", "config.json"))
    assert cli.main(["demo", "--model", tiny_dir, "--workdir", str(tmp_path / "x"), "--lora=-1"]) == 2

"""`kto-jax eval` end to end on a tiny random chat model: rewards + judged winrate."""

import json
import os

import pytest

from kto_jax import cli
from kto_jax.eval import winrate

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_cpu.py")


def test_eval_cli_rewards_and_winrate(tiny_dir, tmp_path, capsys):
    from tiny_judges import longer_wins
    from tiny_models import write_unpaired_feedback
    data = str(tmp_path / "heldout.jsonl")
    write_unpaired_feedback(data, 12, seed=4)
    out = str(tmp_path / "result.json")
    code = cli.main(["eval", "--model", tiny_dir, "--data", data, "--judge", "tiny_judges:longer_wins",
                     "--max_new_tokens", "5", "--batch_size", "4", "--out", out,
                     f"--config={CONFIG}", f"--config.model.path={tiny_dir}",
                     "--config.data.max_length=96", "--config.data.max_prompt_length=48",
                     "--config.data.bucket_lengths=(48,)", "--config.train.micro_batch_size=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "winrate vs reference completions" in printed and "90% Wilson CI" in printed
    result = json.load(open(out))
    # The policy is its own reference here: every implied reward is 0, up to float32 rounding
    # (policy and reference log-probs come from two XLA programs, whose fusions may round
    # differently on another CPU: 9.5e-8 seen on one machine, exactly 0 on another).
    assert result["rewards"]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert result["rewards"]["examples"] == 12
    targets, skipped = winrate.reference_targets(data)
    items = result["winrate"]["items"]
    assert len(items) == len(targets) and skipped == 6 - len(targets)
    assert [i["reference"] for i in items] == [t.reference for t in targets]
    outcomes = [longer_wins("", i["generation"], i["reference"]) for i in items]
    assert [i["outcome"] for i in items] == outcomes
    assert result["winrate"]["winrate"]["rate"] == pytest.approx(sum(outcomes) / len(outcomes))


def test_eval_cli_errors(tiny_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", tiny_dir, "--data", "x.jsonl"]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path), "--data", "x.jsonl", f"--config={CONFIG}",
                     "--judge", "tiny_judges:longer_wins", "--no_rewards"]) == 2
    assert "neither a Hugging Face directory" in capsys.readouterr().err

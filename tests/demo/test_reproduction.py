"""The reproduction script's data and table helpers (the runs themselves use the demo's path)."""

import json

from kto_jax.demo import reproduction
from kto_jax.eval.sampling import Generation

UP = "Cats purr when they are content."          # passes the demo rule
DOWN = "Cats purr for a great many reasons that scientists have studied for a very long time indeed."


def _gen(prompt, text):
    return Generation([{"role": "user", "content": prompt}], text, [], True)


def test_pairs_join_up_and_down_samples_of_the_same_prompt(tmp_path):
    gens = [_gen("a", UP), _gen("a", DOWN), _gen("a", DOWN),   # 1 pair
            _gen("b", UP), _gen("b", UP), _gen("b", UP),       # none: no thumbs-down
            _gen("c", DOWN), _gen("c", UP), _gen("c", UP)]     # 1 pair
    path = str(tmp_path / "pairs.jsonl")
    assert reproduction.write_pairs(path, gens, per_prompt=3) == 2
    rows = [json.loads(line) for line in open(path)]
    assert [r["prompt"][0]["content"] for r in rows] == ["a", "c"]
    assert all(r["chosen"][0]["content"] == UP and r["rejected"][0]["content"] == DOWN for r in rows)


def test_results_table():
    rate = {"rate": 0.5, "low": 0.4, "high": 0.6, "n": 64}
    table = reproduction.results_table({"methods": {
        "reference (before)": {"pass_rate": rate, "kl": 0.0},
        "KTO": {"pass_rate": rate, "kl": 1.234, "heldout_eval": {"rewards/accuracies": 0.75}}}})
    lines = table.splitlines()
    assert lines[2] == "| reference (before) | 50.0% [40.0, 60.0] (n=64) | 0.00 | - |"
    assert lines[3] == "| KTO | 50.0% [40.0, 60.0] (n=64) | 1.23 | 75% |"
    assert set(reproduction.METHODS) >= {"KTO", "KTO no z0", "KTO concave", "KTO risk-neutral"}

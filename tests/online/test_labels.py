"""Verdicts -> examples (kto_jax/online/labels.py), prompt draws and the online config
checks, against hand-worked cases."""

import json
import subprocess
import sys

import pytest

from kto_jax.config import config_file
from kto_jax.errors import UserError
from kto_jax.online import labels
from kto_jax.online.prompts import prompt_sets, round_prompt_ids
from kto_jax.online.report import round_record
from kto_jax.online.settings import OnlineSettings

# prompt 0: scores 0.9, 0.2, 0.9, 0.4; prompt 1: all 0.7 (no signal); prompt 2 (chat): 0.1, 0.6
SAMPLES = [{"prompt_id": p, "sample": s, "prompt": prompt, "completion": f"c{p}{s}", "score": score}
           for p, prompt, scores in ((0, "x0", (0.9, 0.2, 0.9, 0.4)), (1, "x1", (0.7,) * 4),
                                     (2, [{"role": "user", "content": "x2"}], (0.1, 0.6)))
           for s, score in enumerate(scores)]


def test_threshold_labels_every_sample():
    got = labels.labels(SAMPLES, "threshold", 0.5, 1)
    assert got == [True, False, True, False, True, True, True, True, False, True]
    rows = labels.examples(SAMPLES, got, "threshold")
    assert len(rows) == 10 and rows[1] == {"prompt": "x0", "completion": "c01", "label": False}
    assert rows[9]["completion"] == [{"role": "assistant", "content": "c21"}]  # chat stays chat


def test_top_bottom_k_ranks_within_a_prompt_and_skips_ties():
    # prompt 0 ranked: s0 (0.9), s2 (0.9, later index), s3 (0.4), s1 (0.2)
    got = labels.labels(SAMPLES, "top_bottom_k", 0.5, 1)
    assert got == [True, False, None, None, None, None, None, None, False, True]
    got2 = labels.labels(SAMPLES, "top_bottom_k", 0.5, 2)
    assert got2[:4] == [True, False, True, False]


def test_pairs_are_best_against_worst():
    got = labels.labels(SAMPLES, "pairs", 0.5, 1)
    rows = labels.examples(SAMPLES, got, "pairs")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:1]] == [("x0", "c00", "c01")]
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "c21"}]
    assert len(rows) == 2  # prompt 1 ties everywhere


def test_round_record_pass_rate_and_counts():
    row = round_record(3, heldout_scores=[1.0, 0.0, 1.0, 1.0], threshold=0.5,
                       train_scores=[0.9, 0.1], train_labels=[True, False], num_pairs=None,
                       eval_metrics={"rewards/margins": 0.25, "loss": 0.4, "kl": 0.1}, kl_ref=0.05)
    assert row["judge/pass_rate"] == 0.75 and row["judge/n"] == 4
    # Wilson 90%: z = 1.644854, p = 0.75, n = 4: denominator 1 + z^2/4 = 1.676386,
    # center (0.75 + z^2/8) / 1.676386 = 0.649131, half z / 1.676386 * sqrt(0.046875 + z^2/64)
    # = 0.292963
    assert row["judge/pass_rate_low"] == pytest.approx(0.356168, abs=1e-5)
    assert row["judge/pass_rate_high"] == pytest.approx(0.942094, abs=1e-5)
    assert row["judge/train_pass_rate"] == 0.5
    assert (row["heldout/rewards_margins"], row["kl_ref"], row["round"]) == (0.25, 0.05, 3)
    assert (row["examples/desirable"], row["examples/undesirable"]) == (1, 1)


def test_round_prompts_are_seeded_per_round(tmp_path):
    a, b = round_prompt_ids(10, 4, 0, 1), round_prompt_ids(10, 4, 0, 2)
    assert a == round_prompt_ids(10, 4, 0, 1) and a != b and len(set(a)) == 4
    assert round_prompt_ids(10, 0, 0, 1) == list(range(10))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    sets = prompt_sets(str(path), "", 0.2, 0)
    assert len(sets.train) == 8 and len(sets.heldout) == 2
    assert sorted(sets.train + sets.heldout) == sorted(f"q{i}" for i in range(10))


def _config(**online):
    c = config_file("online_tiny_cpu")
    c.online.prompts_path, c.online.judge = "p.jsonl", "online_judge:score"
    for key, value in online.items():
        c.online[key] = value
    return c


@pytest.mark.parametrize("online, needle", [
    (dict(labeling="pairs"), "is unpaired"),
    (dict(labeling="top_bottom_k", k=3), "samples_per_prompt >= 6"),
    (dict(temperature=0.0), "identical samples"),
    (dict(reference="frozen"), "online.reference='frozen'"),
    (dict(rounds=0), "online.rounds=0 must be at least 1"),
    (dict(judge=""), "online.judge is empty"),
])
def test_bad_online_config_names_the_field(online, needle):
    with pytest.raises(UserError, match=None) as err:
        OnlineSettings.from_config(_config(**online))
    assert needle in str(err.value)


def test_packing_is_refused_by_online_rounds():
    c = _config()
    c.data.packing = True
    with pytest.raises(UserError, match="data.packing=True: kto-jax online pads"):
        OnlineSettings.from_config(c)


def test_paired_loss_needs_pairs():
    c = _config()
    c.loss.name = "dpo"
    with pytest.raises(UserError, match="online.labeling=\"pairs\""):
        OnlineSettings.from_config(c)
    c.online.labeling = "pairs"
    assert OnlineSettings.from_config(c).labeling == "pairs"


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kto_jax.cli", "online",
                           "--config=configs/online_tiny_cpu.py", f"--workdir={tmp_path}",
                           "--config.online.labeling=best"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "online.labeling='best'" in proc.stderr and "online.prompts_path is empty" in proc.stderr

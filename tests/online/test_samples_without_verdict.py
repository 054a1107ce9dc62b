"""Samples a judge gives no score (None, NaN, absent) are left out of training and of the
pass rates and counted in the round's row; an empty completion is kept. Hand-computed."""

import math

import pytest

from kto_jax.errors import UserError
from kto_jax.eval.judges import ScoreJudge
from kto_jax.online import labels as labels_lib
from kto_jax.online.report import round_record


def _sample(prompt_id, sample, score, completion="an answer"):
    out = {"prompt_id": prompt_id, "sample": sample, "prompt": "q", "completion": completion}
    if score != "absent":
        out["score"] = score
    return out


SAMPLES = [_sample(0, 0, 0.9), _sample(0, 1, float("nan")), _sample(0, 2, 0.1, completion=""),
           _sample(1, 0, None), _sample(1, 1, "absent"), _sample(1, 2, 0.7), _sample(1, 3, 0.2)]


def test_no_verdict_no_label_in_every_labeling():
    assert labels_lib.labels(SAMPLES, "threshold", 0.5, 1) == [True, None, False, None, None, True, False]
    assert labels_lib.labels(SAMPLES, "top_bottom_k", 0.5, 1) == [True, None, False, None, None, True, False]
    assert labels_lib.labels(SAMPLES, "pairs", 0.5, 1) == [True, None, False, None, None, True, False]
    ranked = labels_lib.by_prompt(SAMPLES)
    assert [[s["sample"] for s in g] for g in ranked] == [[0, 2], [2, 3]]


def test_an_empty_completion_is_kept_as_a_training_example():
    sample_labels = labels_lib.labels(SAMPLES, "threshold", 0.5, 1)
    rows = labels_lib.examples(SAMPLES, sample_labels, "threshold")
    assert {"prompt": "q", "completion": "", "label": False} in rows and len(rows) == 4


def test_the_round_row_counts_samples_without_verdict():
    scores = [s.get("score") for s in SAMPLES]
    row = round_record(1, heldout_scores=scores, threshold=0.5, train_scores=scores[:3],
                       train_labels=None, num_pairs=None, eval_metrics=None, kl_ref=None)
    assert row["judge/n"] == 4 and row["judge/unscored"] == 3
    assert row["judge/pass_rate"] == pytest.approx(2 / 4)          # 0.9 and 0.7 of 4 scored
    assert row["judge/train_unscored"] == 1
    assert row["judge/train_pass_rate"] == pytest.approx(1 / 2)


def test_a_function_judges_none_is_nan_and_a_winrate_refuses_it():
    judge = ScoreJudge(lambda ps, cs: [None if c == "?" else len(c) for c in cs], "lengths")
    got = judge.scores(["p", "p"], ["?", "abc"])
    assert math.isnan(got[0]) and got[1] == 3.0
    with pytest.raises(UserError, match="gave no score .* in 1 of 2"):
        judge.compare(["p", "p"], ["?", "ab"], ["a", "b"])
    bad = ScoreJudge(lambda ps, cs: ["high" for _ in cs], "words")
    with pytest.raises(UserError, match="returned 'high'"):
        bad.scores(["p"], ["x"])

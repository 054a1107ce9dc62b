"""Formats: detection from columns, row validation errors, unpairing and scoring rules."""

import pytest

from kto_jax.data import formats
from kto_jax.data.readers import RowSet
from kto_jax.errors import UserError


def rowset(records):
    return RowSet("mem.jsonl", "jsonl", records, list(range(1, len(records) + 1)))


U = {"prompt": "p", "completion": "c", "label": True}
P = {"prompt": "p", "chosen": "good", "rejected": "bad"}
S = {"prompt": "p", "completion": "c", "score": 7.5}
MSG = [{"role": "user", "content": "hi"}]
ANS = [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("record, expected", [
    (U, ("unpaired", False)), (P, ("paired", False)), (S, ("scored", False)),
    ({"prompt": MSG, "completion": ANS, "label": False}, ("unpaired", True)),
    ({"prompt": MSG, "chosen": ANS, "rejected": ANS}, ("paired", True)),
    ({"prompt": MSG, "completion": ANS, "score": 1}, ("scored", True)),
    ({"chosen": MSG + ANS, "rejected": MSG + ANS}, ("paired", True)),
    ({**U, "extra": 1}, ("unpaired", False)),
])
def test_detect_format(record, expected):
    assert formats.detect_format(rowset([record])) == expected


def test_unknown_format_lists_columns_and_formats():
    with pytest.raises(UserError) as err:
        formats.detect_format(rowset([{"question": "q", "answer": "a"}]))
    text = str(err.value)
    assert "answer, question" in text
    for name, cols in formats.FORMATS.items():
        assert f"{name} ({', '.join(cols)})" in text


def test_ambiguous_and_configured_formats():
    both = {**U, "score": 1.0}
    with pytest.raises(UserError, match="fit several formats"):
        formats.detect_format(rowset([both]))
    assert formats.detect_format(rowset([both]), "scored") == ("scored", False)
    with pytest.raises(UserError, match="data.format=paired needs columns prompt, chosen, rejected"):
        formats.detect_format(rowset([U]), "paired")
    with pytest.raises(UserError, match="not a format"):
        formats.detect_format(rowset([U]), "kto")


def test_empty_dataset():
    with pytest.raises(UserError, match="no records found"):
        formats.detect_format(rowset([]))


def test_row_errors_are_collected_with_locations():
    records = [U, {"prompt": "p", "label": True}, {"prompt": "", "completion": "c", "label": True},
               {"prompt": "p", "completion": "c", "label": 1},
               {"prompt": "p", "completion": "c", "label": "true"},
               {"prompt": 3, "completion": "c", "label": False}]
    with pytest.raises(UserError) as err:
        formats.normalise_unpaired(rowset(records), "unpaired", False)
    text = str(err.value)
    assert "mem.jsonl:2: missing field 'completion'" in text
    assert "mem.jsonl:3: empty field 'prompt'" in text
    assert "mem.jsonl:4: field 'label' must be a bool (true/false), got int 1" in text
    assert "mem.jsonl:5: field 'label' must be a bool (true/false), got str 'true'" in text
    assert "mem.jsonl:6: field 'prompt' must be text, got int" in text
    assert "(5 problems)" in text


@pytest.mark.parametrize("score, message", [
    ("4.5", "field 'score' must be a number, got str '4.5'"),
    (True, "field 'score' must be a number, got bool"),
    (float("nan"), "field 'score' must be finite"),
    (None, "missing field 'score'"),
])
def test_score_must_be_a_finite_number(score, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        formats.normalise_unpaired(rowset([{**S, "score": score}]), "scored", False)


def test_conversational_message_errors():
    records = [{"prompt": MSG, "completion": "plain", "label": True},
               {"prompt": [{"role": "user"}], "completion": ANS, "label": True},
               {"prompt": [], "completion": ANS, "label": True},
               {"prompt": MSG, "completion": [{"role": "assistant", "content": " "}], "label": True}]
    with pytest.raises(UserError) as err:
        formats.normalise_unpaired(rowset(records), "unpaired", True)
    text = str(err.value)
    assert "mem.jsonl:1: field 'completion' must be a list of {role, content} messages" in text
    assert "mem.jsonl:2: field 'prompt' message 0 must be {'role': str, 'content': str}" in text
    assert "mem.jsonl:3: empty field 'prompt' (no messages)" in text
    assert "mem.jsonl:4: empty field 'completion' (every message content is empty)" in text


def test_scored_threshold_and_weighting():
    rows = rowset([{**S, "score": 9.0}, {**S, "score": 2.0}, {**S, "score": 5.0}])
    plain = formats.normalise_unpaired(rows, "scored", False, score_threshold=5.0)
    assert [e.desirable for e in plain] == [True, False, False]
    assert [e.weight for e in plain] == [1.0, 1.0, 1.0]
    weighted = formats.normalise_unpaired(rows, "scored", False, score_threshold=5.0,
                                          score_weighting=True)
    assert [e.weight for e in weighted] == [4.0, 3.0, 0.0]


def test_unpair_and_one_y_per_x():
    pairs = formats.normalise_pairs(rowset([P] * 200), False)
    both = formats.unpair(pairs, one_y_per_x=False, seed=0)
    assert [(e.completion, e.desirable) for e in both[:2]] == [("good", True), ("bad", False)]
    assert len(both) == 400
    one = formats.unpair(pairs, one_y_per_x=True, seed=0)
    assert len(one) == 200
    n_chosen = sum(e.desirable for e in one)
    assert 70 < n_chosen < 130                   # each side with probability 1/2
    assert one == formats.unpair(pairs, one_y_per_x=True, seed=0)
    assert one != formats.unpair(pairs, one_y_per_x=True, seed=1)


def test_implicit_prompt_is_the_shared_messages():
    record = {"chosen": MSG + ANS, "rejected": MSG + [{"role": "assistant", "content": "no"}]}
    (pair,) = formats.normalise_pairs(rowset([record]), True)
    assert pair.prompt == MSG and pair.chosen == ANS
    assert pair.rejected == [{"role": "assistant", "content": "no"}]
    with pytest.raises(UserError, match="share no leading prompt messages"):
        formats.normalise_pairs(rowset([{"chosen": ANS, "rejected": MSG}]), True)
    with pytest.raises(UserError, match="add a prompt column"):
        formats.normalise_pairs(rowset([{"chosen": "a", "rejected": "b"}]), False)

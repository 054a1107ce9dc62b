"""The data of an online round: a policy may end its answer at once, so with
`DataSettings.empty_completions` an empty completion is its end-of-sequence token alone (as TRL tokenizes
completions; user data still refuses it); and `kto-jax online`, which refuses
loss.auto_weights, is never told to set it (`DataSettings.offer_auto_weights=False`)."""

import random

import numpy as np
import pytest

from kto_jax.data import build_datasets
from kto_jax.errors import UserError
from kto_jax.train.settings import read_data_settings

from conftest import base_config, conversation, unpaired_rows, write_jsonl


def _completions(datasets):
    """Every valid row's completion ids (right-padded, mask applied), across the batches."""
    out = []
    for batch in datasets.train_iter_factory(forever=False):
        ids, mask, valid = (np.asarray(batch[k]) for k in ("completion_ids", "completion_mask", "valid"))
        for row_ids, row_mask in zip(ids[valid], mask[valid]):
            out.append(row_ids[row_mask.astype(bool)].tolist())
    return out


def _build(tokenizer, path, **kwargs):
    config = base_config(**{"data.train_path": path, "data.max_length": 128,
                            "data.max_prompt_length": 64})
    settings = read_data_settings(config).replace(**kwargs)   # online rounds set these fields
    return build_datasets(settings, tokenizer, process_index=0, process_count=1)


def test_an_empty_text_completion_is_its_eos_token(tokenizer, tmp_path):
    rows = unpaired_rows(8)
    rows[3]["completion"] = ""
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(UserError, match="t.jsonl:4: empty field 'completion'"):
        _build(tokenizer, path)
    completions = _completions(_build(tokenizer, path, empty_completions=True))
    assert len(completions) == 8 and [tokenizer.eos_token_id] in completions


def test_an_empty_assistant_turn_is_the_templates_end_of_turn(tokenizer, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(8):
        prompt, answer = conversation(rng)
        rows.append({"prompt": prompt, "completion": answer, "label": i % 2 == 0})
    rows[5]["completion"] = [{"role": "assistant", "content": ""}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(UserError, match="every message content is empty"):
        _build(tokenizer, path)
    completions = _completions(_build(tokenizer, path, empty_completions=True))
    end_of_turn = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert len(completions) == 8 and end_of_turn in completions


def test_the_eq9_warning_offers_auto_weights_only_where_it_is_taken(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(40, desirable_every=4))
    offered = _build(tokenizer, path).summary.warnings
    assert len(offered) == 1 and "--config.loss.auto_weights=True or" in offered[0]
    (online,) = _build(tokenizer, path, offer_auto_weights=False).summary.warnings
    assert "auto_weights" not in online
    assert "outside the paper's [1, 4/3]" in online and "--config.loss.desirable_weight=" in online

"""Rows the data checks used to accept silently are dropped, counted and named by file and
line: pairs whose chosen and rejected are the same (no preference), scored rows of weight 0
(no signal), and conversations the model's chat template refuses to render."""

import random

import pytest
from transformers import AutoTokenizer

from kto_jax.data import build_datasets, formats, tokenize
from kto_jax.train.settings import read_data_settings
from kto_jax.errors import UserError

from conftest import base_config, conversation, paired_rows, unpaired_rows, write_jsonl

# A template like Llama-2's and Mistral's: it raises on a conversation that does not alternate.
STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(tokenizer, path, **overrides):
    return build_datasets(read_data_settings(base_config(**{"data.train_path": path, **overrides})),
                          tokenizer, process_index=0, process_count=1)


def test_identical_chosen_and_rejected_are_dropped_with_file_and_line(tokenizer, tmp_path):
    rows = paired_rows(20)
    for i in (4, 11):
        rows[i]["rejected"] = rows[i]["chosen"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    _, _, paired = build(tokenizer, path, **{"loss.name": "dpo"})
    assert paired.train.kept == 18 and paired.train.examples == 20
    text = str(paired)
    assert (f"dropped 2: chosen and rejected are the same completion (no preference to learn), "
            f"e.g.\n    {path}:5\n    {path}:12") in text
    _, _, unpaired = build(tokenizer, path)              # KTO: both sides of each pair dropped
    assert unpaired.train.examples == 40 and unpaired.train.kept == 36
    assert unpaired.train.tokens.dropped_count[formats.NO_PREFERENCE] == 4
    assert (unpaired.n_desirable, unpaired.n_undesirable) == (18, 18)


def test_zero_weight_scores_are_dropped_with_file_and_line(tokenizer, tmp_path):
    rows = [{**row, "score": float(i % 4)} for i, row in enumerate(unpaired_rows(16))]
    for row in rows:
        del row["label"]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    over = {"data.score_threshold": 2.0, "data.score_weighting": True}
    _, _, summary = build(tokenizer, path, **over)
    assert summary.train.kept == 12                       # scores 2.0 at lines 3, 7, 11, 15
    assert "dropped 4: score equals data.score_threshold" in str(summary)
    assert f"    {path}:3\n    {path}:7\n" in str(summary)
    _, _, plain = build(tokenizer, path, **{"data.score_threshold": 2.0})
    assert plain.train.kept == 16                         # no weighting: 2.0 is undesirable, kept


@pytest.fixture()
def strict_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = STRICT
    return tok


def test_conversations_the_template_refuses_are_dropped_with_file_and_line(strict_tokenizer, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(12):
        prompt, answer = conversation(rng)
        rows.append({"prompt": prompt, "completion": answer, "label": i % 2 == 0})
    rows[2]["prompt"] = [{"role": "assistant", "content": "hello"}] + rows[2]["prompt"]
    rows[9]["completion"] = [{"role": "user", "content": "the cat"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    over = {"data.max_length": 128, "data.max_prompt_length": 64}
    _, _, summary = build(strict_tokenizer, path, **over)
    assert summary.train.kept == 10
    text = str(summary)
    assert f"dropped 2: {tokenize.TEMPLATE_REFUSED}, e.g." in text
    assert (f"    {path}:3: the prompt's messages: TemplateError: Conversation roles must "
            "alternate") in text
    assert f"    {path}:10: the prompt and completion's messages: TemplateError" in text
    rows[9]["completion"] = rows[2]["prompt"] = [{"role": "user", "content": "x"}] * 2
    with pytest.raises(UserError, match="the train split is empty after filtering") as err:
        build(strict_tokenizer, write_jsonl(tmp_path / "all.jsonl", [rows[2]] * 8), **over)
    assert tokenize.TEMPLATE_REFUSED in str(err.value)

"""Tokenization: BOS/EOS, left/right truncation, overlong drops, the chat-template prefix."""

import copy

import pytest

from kto_jax.data import tokenize
from kto_jax.data.formats import Example, Pair
from kto_jax.errors import UserError

from conftest import CHATML

LIMITS = dict(max_length=64, max_prompt_length=32)
WIDE = dict(max_length=256, max_prompt_length=128)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def words(n):
    return " ".join(["cat", "dog", "tree", "moon"][i % 4] for i in range(n))


def test_plain_text_gets_the_tokenizers_bos_and_an_eos(tokenizer):
    ex = Example("the cat sat", "on a mat", True, 1.0, "f:1")
    split, report = tokenize.tokenize_split([ex], tokenizer, conversational=False, **LIMITS)
    assert list(split.prompts[0]) == [tokenizer.bos_token_id] + ids(tokenizer, "the cat sat")
    assert list(split.completions[0][0]) == ids(tokenizer, "on a mat") + [tokenizer.eos_token_id]
    assert report.dropped_count == {} and report.prompts_truncated == 0


def test_prompt_loses_its_left_end_and_completion_its_right_end(tokenizer):
    prompt, completion = words(45), words(60)
    full_prompt = [tokenizer.bos_token_id] + ids(tokenizer, prompt)
    full_completion = ids(tokenizer, completion) + [tokenizer.eos_token_id]
    assert 32 < len(full_prompt) <= 64 and len(full_completion) > 32
    split, report = tokenize.tokenize_split([Example(prompt, completion, False, 1.0, "f:1")],
                                            tokenizer, conversational=False, **LIMITS)
    assert list(split.prompts[0]) == full_prompt[-32:]
    assert list(split.completions[0][0]) == full_completion[:64 - 32]
    assert (report.prompts_truncated, report.completions_truncated) == (1, 1)


def test_max_completion_length_caps_completions(tokenizer):
    ex = Example("a cat", words(40), True, 1.0, "f:1")
    split, report = tokenize.tokenize_split([ex], tokenizer, conversational=False,
                                            max_completion_length=10, **LIMITS)
    assert list(split.completions[0][0]) == ids(tokenizer, words(40))[:10]
    assert report.completions_truncated == 1


def test_overlong_prompts_are_dropped_and_counted_or_raise(tokenizer):
    items = [Example(words(80), "yes", True, 1.0, "f:1"), Example("a cat", "yes", False, 1.0, "f:2")]
    split, report = tokenize.tokenize_split(items, tokenizer, conversational=False, **LIMITS)
    assert len(split) == 1 and split.where == ["f:2"]
    assert report.dropped_count == {tokenize.OVERLONG: 1}
    assert report.dropped[tokenize.OVERLONG][0].startswith("f:1: ")
    assert report.dropped[tokenize.OVERLONG][0].endswith(" prompt tokens")
    with pytest.raises(UserError, match=r"1 example\(s\) have a prompt longer than "
                                        r"data.max_length=64 tokens \(e.g. f:1"):
        tokenize.tokenize_split(items, tokenizer, conversational=False, on_overlong="error",
                                **LIMITS)


def test_conversational_prompt_tokens_are_a_prefix(tokenizer):
    prompt = [{"role": "system", "content": "be good"}, {"role": "user", "content": "the sky"}]
    answer = [{"role": "assistant", "content": "is blue"}]
    split, report = tokenize.tokenize_split([Example(prompt, answer, True, 1.0, "f:1")], tokenizer,
                                            conversational=True, **WIDE)
    rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    rendered_full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    p, c = list(split.prompts[0]), list(split.completions[0][0])
    assert p == ids(tokenizer, rendered_prompt)              # no extra BOS: the template owns it
    assert tokenizer.decode(p + c) == rendered_full          # prompt + completion = conversation
    assert c == ids(tokenizer, rendered_full[len(rendered_prompt):])
    assert report.boundary_retokenized == 0


def test_boundary_merges_are_noted_and_split_tokens_kept(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    prompt, answer = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "cat"}]
    split, report = tokenize.tokenize_split([Example(prompt, answer, True, 1.0, "f:1")], tok,
                                            conversational=True, **WIDE)
    assert ids(tok, "assistant: cat") != ids(tok, "assistant: ") + ids(tok, "cat")  # " cat" merges
    assert report.boundary_retokenized == 1
    assert list(split.prompts[0]) == ids(tok, "user: hi\nassistant: ")
    assert list(split.completions[0][0]) == ids(tok, "cat\n")


def test_template_that_rewrites_the_prompt_is_reported_per_example(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% if messages[-1]['role'] == 'assistant' %}[done]{% endif %}" + CHATML
    prompt, answer = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yes"}]
    items = [Example(prompt, answer, True, 1.0, "f:7")]
    split, report = tokenize.tokenize_split(items, tok, conversational=True, **WIDE)
    assert len(split) == 0
    (listed,) = report.dropped[tokenize.PREFIX_MISMATCH]
    assert listed.startswith("f:7: the rendered prompt is not a prefix of the rendered conversation")
    with pytest.raises(UserError, match=r"f:7: the rendered prompt is not a prefix of the rendered "
                                        r"conversation \(they differ at character 0"):
        tokenize.tokenize_split(items, tok, conversational=True, on_prefix_mismatch="error",
                                **WIDE)


def test_conversational_data_needs_a_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    item = Example([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "x"}],
                   True, 1.0, "f:1")
    with pytest.raises(UserError, match="tokenizer has no chat template"):
        tokenize.tokenize_split([item], tok, conversational=True, **LIMITS)


def test_pairs_share_the_prompt_and_truncate_each_side(tokenizer):
    pair = Pair("a cat", words(70), "no", "f:1")
    split, report = tokenize.tokenize_split([pair], tokenizer, conversational=False, **LIMITS)
    assert split.paired and len(split.completions) == 2
    p = len(split.prompts[0])
    assert len(split.completions[0][0]) == 64 - p
    assert list(split.completions[1][0]) == ids(tokenizer, "no") + [tokenizer.eos_token_id]
    assert split.completion_lengths[0] == 64 - p
    assert report.completions_truncated == 1


def test_ragged_round_trip():
    seqs = [[1, 2, 3], [], [4], [5, 6]]
    ragged = tokenize.Ragged.from_lists(seqs)
    assert [list(ragged[i]) for i in range(4)] == seqs
    assert list(ragged.lengths) == [3, 0, 1, 2]

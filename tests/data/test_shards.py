"""Per-process tokenization: slices, the statistics all-gather, the batch-time cache."""

import zlib

import numpy as np
import pytest

from kto_jax.data import formats, shards, tokenize
from kto_jax.data.formats import Example
from kto_jax.errors import UserError

from conftest import WORDS

SPEC = dict(conversational=False, max_length=64, max_prompt_length=32)


def examples(n, overlong=()):
    out = []
    for i in range(n):
        prompt = " ".join(["star"] * 200) if i in overlong else " ".join(WORDS[i % 7:i % 7 + 3])
        out.append(Example(prompt, " ".join(WORDS[i % 5:i % 5 + 2 + i % 4]), i % 3 == 0,
                           1.0 + i, f"f:{i + 1}"))
    return out


def sharded(items, tokenizer, count, processes=None, **policy):
    """Processes' (default: all `count`) results, the all-gather fed from precomputed slices."""
    spec = tokenize.TokenSpec(tokenizer, **SPEC)
    per = -(-len(items) // count)
    padded = []
    for p in range(count):
        lo, hi = shards.slice_bounds(len(items), p, count)
        block = np.full((per, tokenize.N_STATS), -1, np.int64)
        block[:hi - lo] = tokenize.tokenize_items(items[lo:hi], spec)[0]
        padded.append(block)
    policy = {"on_overlong": "drop", "on_prefix_mismatch": "drop", **policy}
    return [shards.tokenize_sharded(formats.Examples.of(items), spec, process_index=p, process_count=count,
                                    allgather=lambda x: np.stack(padded), **policy)
            for p in (range(count) if processes is None else processes)]


def test_slices_cover_every_example_once():
    for n, count in ((10, 3), (2, 4), (45, 2)):
        bounds = [shards.slice_bounds(n, p, count) for p in range(count)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_gathered_statistics_equal_one_process(tokenizer):
    items = examples(11, overlong={4, 9})
    (whole, whole_report), = sharded(items, tokenizer, 1)
    reference, reference_report = tokenize.tokenize_split(items, tokenizer, **SPEC)
    assert whole_report == reference_report and len(whole) == 9
    for count in (2, 3):
        for p, (split, report) in enumerate(sharded(items, tokenizer, count)):
            assert report == reference_report
            np.testing.assert_array_equal(split.prompt_lengths, reference.prompt_lengths)
            np.testing.assert_array_equal(split.completion_lengths, reference.completion_lengths)
            np.testing.assert_array_equal(split.desirable, reference.desirable)
            np.testing.assert_array_equal(split.weight, reference.weight)
            np.testing.assert_array_equal(split.token_hash, whole.token_hash)
            assert len(split.cache) < len(reference)          # only its own slice is cached
            for k in range(len(reference)):                   # cache or batch-time: same ids
                got = split.row_tokens(np.array([k]))
                np.testing.assert_array_equal(got.prompts[k], reference.prompts[k])
                np.testing.assert_array_equal(got.completions[0][k], reference.completions[0][k])
    k = 3
    crc = zlib.crc32(b"|" + reference.completions[0][k].tobytes(),
                     zlib.crc32(reference.prompts[k].tobytes()))
    assert whole.token_hash[k] == crc


def test_error_policies_apply_to_the_gathered_rows_on_every_process(tokenizer):
    items = examples(8, overlong={6})                          # in the last process's slice
    for p in range(2):
        with pytest.raises(UserError, match=r"1 example\(s\) have a prompt longer .* \(e.g. f:7"):
            sharded(items, tokenizer, 2, processes=[p], on_overlong="error")


def test_jax_allgather_keeps_int64_in_one_process():
    x = np.array([[2 ** 32 + 5, -1], [2 ** 31 + 7, 3]], np.int64)
    np.testing.assert_array_equal(shards.jax_allgather(x), x[None])


def test_other_lengths_at_batch_time_are_refused(tokenizer):
    items = examples(6)
    split, _ = sharded(items, tokenizer, 2)[0]
    split.prompt_lengths = split.prompt_lengths + 1          # as if the tokenizer changed
    split.row_tokens(np.array([0, 1]))                        # cached rows are not re-tokenized
    with pytest.raises(RuntimeError, match="not deterministic"):
        split.row_tokens(np.array([0, 5]))

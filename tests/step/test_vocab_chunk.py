"""config.train.logprob_vocab_chunk=0 (the default): the whole vocabulary in one LM-head chunk
when a forward's float32 logits fit WHOLE_VOCAB_BYTES, else DEFAULT_VOCAB_CHUNK columns; the
log-probs are the definition's either way."""

import os
import sys

import jax
import numpy as np
from flax import nnx

from kto_jax.models.logprobs import DEFAULT_VOCAB_CHUNK
from kto_jax.models.transformer import Transformer
from kto_jax.step import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from step_testlib import MODEL, make_batch, naive_logps  # noqa: E402  pylint: disable=wrong-import-position


def test_auto_chunk_is_the_whole_vocabulary_when_its_logits_fit():
    budget_positions = stats.WHOLE_VOCAB_BYTES // (4 * 49152)    # SmolLM2's vocabulary
    assert stats.vocab_chunk_for(0, 8 * 16, 49152) == 49152       # short rows, small batch
    assert stats.vocab_chunk_for(0, budget_positions, 49152) == 49152
    assert stats.vocab_chunk_for(0, budget_positions + 1, 49152) == DEFAULT_VOCAB_CHUNK
    assert stats.vocab_chunk_for(0, 16 * 1024, 128256) == DEFAULT_VOCAB_CHUNK
    assert stats.vocab_chunk_for(48, 8, 128) == 48                # set: kept


def test_auto_chunk_log_probs_are_the_definition():
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    b = make_batch(3)
    x, xm, y, ym = (b[k][0] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                      "completion_mask"))
    want = naive_logps(graphdef, params, x, xm, y, ym)
    for chunk in (0, 48):
        got = jax.jit(stats.forward, static_argnums=(0, 6))(graphdef, params, x, xm, y, ym, chunk)
        np.testing.assert_allclose(got.logps, want, rtol=1e-5, atol=1e-5)

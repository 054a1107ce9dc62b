"""Vocab-chunked completion log-probs against a naive float32 log_softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.models.logprobs import completion_logps, sequence_logps, token_logps_from_hidden
from kto_jax.models.config import tiny
from kto_jax.models.transformer import Transformer, positions_from_mask


def _naive_token_logps(h, w, labels, softcap=None):
    logits = jnp.einsum("bcd,dv->bcv", h.astype(jnp.float32), w.astype(jnp.float32),
                        precision="highest")
    if softcap is not None:  # Gemma 2's final-logit soft-cap, as transformers applies it
        logits = jnp.tanh(logits / softcap) * softcap
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    b, c, d, v = 3, 5, 16, 37  # 37 is prime: every chunk size but 1 and 37 leaves a remainder
    h = jax.random.normal(k[0], (b, c, d))
    w = jax.random.normal(k[1], (d, v)) * 0.5
    labels = jax.random.randint(k[2], (b, c), 0, v)
    cot = jax.random.normal(k[3], (b, c))
    return h, w, labels, cot


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("chunk", [1, 10, 37, 4096])
def test_token_logps_match_naive_values_and_grads(inputs, chunk, softcap):
    h, w, labels, cot = inputs
    got = token_logps_from_hidden(h, w, labels, vocab_chunk=chunk, softcap=softcap)
    want = _naive_token_logps(h, w, labels, softcap)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def weighted(fn):
        return lambda h_, w_: (fn(h_, w_) * cot).sum()

    g_got = jax.grad(weighted(lambda a, b: token_logps_from_hidden(a, b, labels, vocab_chunk=chunk,
                                                                   softcap=softcap)),
                     argnums=(0, 1))(h, w)
    g_want = jax.grad(weighted(lambda a, b: _naive_token_logps(a, b, labels, softcap)),
                      argnums=(0, 1))(h, w)
    for got_, want_ in zip(g_got, g_want):
        np.testing.assert_allclose(got_, want_, rtol=1e-4, atol=1e-5)


def test_token_logps_bf16_inputs_accumulate_in_float32(inputs):
    h, w, labels, _ = inputs
    got = token_logps_from_hidden(h.astype(jnp.bfloat16), w, labels, vocab_chunk=8)
    want = _naive_token_logps(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    dh, dw = jax.grad(lambda a, b: token_logps_from_hidden(a, b, labels, vocab_chunk=8).sum(),
                      argnums=(0, 1))(h.astype(jnp.bfloat16), w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert np.isfinite(np.asarray(dh, np.float32)).all() and np.isfinite(dw).all()


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_no_full_vocab_float32_buffer_in_compiled_backward(softcap):
    """The compiled value-and-grad holds no [B, C, V] float32 array: only chunks (also with
    Gemma 2's final-logit soft-cap, which is applied per chunk)."""
    b, c, d, v, chunk = 2, 8, 16, 1024, 128
    h = jnp.ones((b, c, d))
    w = jnp.ones((d, v))
    labels = jnp.zeros((b, c), jnp.int32)
    fn = jax.jit(jax.value_and_grad(
        lambda a, b_: token_logps_from_hidden(a, b_, labels, vocab_chunk=chunk, softcap=softcap).sum(),
        (0, 1)))
    hlo = fn.lower(h, w).compile().as_text()
    assert f"f32[{b},{c},{v}]" not in hlo
    assert f"f32[{b},{c},{chunk}]" in hlo


SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
             num_kv_heads=1, head_dim=16)
CASES = {"llama": tiny(**SHAPE),
         # Gemma 2: final logits soft-capped (inside the vocab chunks), attention logits too
         "gemma2": tiny(**SHAPE, architecture="Gemma2ForCausalLM", final_logit_softcap=0.2,
                        attn_logit_softcap=0.05, query_pre_attn_scalar=24, sliding_window=2,
                        layer_types=("sliding_attention",))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_completion_logps_of_a_padded_batch_match_unpadded_rows(case):
    """Left-padded prompt + right-padded completion: each real completion token is scored by
    the position before it, exactly as in the same row run alone with no padding."""
    model = Transformer(CASES[case], rngs=nnx.Rngs(0))
    x = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]], np.int32)
    y = np.array([[12, 13, 14], [15, 0, 0], [16, 17, 0]], np.int32)
    xm, ym = (x != 0).astype(np.int32), (y != 0).astype(np.int32)
    # every row has 5 real tokens, so the unpadded rows form one [3, 5] batch
    prompts = [r[r != 0] for r in x]
    comps = [r[r != 0] for r in y]
    ids = np.stack([np.concatenate([p, c]) for p, c in zip(prompts, comps)])
    ones = np.ones_like(ids)
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params)
        return (completion_logps(m, x, xm, y, ym, vocab_chunk=40),
                sequence_logps(m, x, xm, y, ym, vocab_chunk=40),
                jax.nn.log_softmax(m(ids, positions_from_mask(ones), ones), -1))

    out, (logps, counts), logp = run(params)
    np.testing.assert_allclose(logps, out.logps)
    np.testing.assert_array_equal(counts, [3, 1, 2])
    for row, (prompt, comp) in enumerate(zip(prompts, comps)):
        want = [logp[row, len(prompt) - 1 + j, tok] for j, tok in enumerate(comp)]
        np.testing.assert_allclose(out.token_logps[row, :len(comp)], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.token_logps[row, len(comp):], 0.0)
    assert out.hidden.shape == (3, 3, 32)

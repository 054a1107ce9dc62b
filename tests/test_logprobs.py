"""Vocab-chunked completion log-probs against a naive float32 log_softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.logprobs import completion_logps, sequence_logps, token_logps_from_hidden


def _naive_token_logps(h, w, labels):
    logits = jnp.einsum("bcd,dv->bcv", h.astype(jnp.float32), w.astype(jnp.float32),
                        precision="highest")
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


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 4096])
def test_token_logps_match_naive_values_and_grads(inputs, chunk):
    h, w, labels, cot = inputs
    got = token_logps_from_hidden(h, w, labels, vocab_chunk=chunk)
    want = _naive_token_logps(h, w, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def weighted(fn):
        return lambda h_, w_: (fn(h_, w_) * cot).sum()

    g_got = jax.grad(weighted(lambda a, b: token_logps_from_hidden(a, b, labels, vocab_chunk=chunk)),
                     argnums=(0, 1))(h, w)
    g_want = jax.grad(weighted(lambda a, b: _naive_token_logps(a, b, labels)), argnums=(0, 1))(h, w)
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


def test_no_full_vocab_float32_buffer_in_compiled_backward():
    """The compiled value-and-grad holds no [B, C, V] float32 array: only chunks."""
    b, c, d, v, chunk = 2, 8, 16, 1024, 128
    h = jnp.ones((b, c, d))
    w = jnp.ones((d, v))
    labels = jnp.zeros((b, c), jnp.int32)
    fn = jax.jit(jax.value_and_grad(
        lambda a, b_: token_logps_from_hidden(a, b_, labels, vocab_chunk=chunk).sum(), (0, 1)))
    hlo = fn.lower(h, w).compile().as_text()
    assert f"f32[{b},{c},{v}]" not in hlo
    assert f"f32[{b},{c},{chunk}]" in hlo

"""Attention of one layer (kto_jax/models/attention.py): soft-capped logits by hand, and the
backend choice for a soft-capped model (Gemma 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.models.attention import attend, causal_mask, masked_attention


def _qkv(seed=0, b=2, t=9, h=4, k=2, hd=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = 2.0 * jax.random.normal(keys[0], (b, t, h, hd))
    return q, jax.random.normal(keys[1], (b, t, k, hd)), jax.random.normal(keys[2], (b, t, k, hd))


def _numpy_attention(q, k, v, window, scale, cap):
    """Per head, per query: softmax over visible keys of cap * tanh(scale q.k / cap)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, _ = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        for n in range(h):
            for s in range(t):
                keys = [j for j in range(t) if j <= s and (window is None or j > s - window)]
                logits = np.array([scale * q[i, s, n] @ k[i, j, n // group] for j in keys])
                logits = cap * np.tanh(logits / cap) if cap else logits
                p = np.exp(logits - logits.max())
                out[i, s, n] = (p / p.sum()) @ v[i, keys, n // group]
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cap", [None, 1.0])
def test_soft_capped_attention_matches_numpy(window, cap):
    q, k, v = _qkv()
    scale = 24 ** -0.5  # query_pre_attn_scalar 24, head_dim 8
    got = attend(q, k, v, None, scale=scale, window=window, impl="xla", softcap=cap)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, window, scale, cap), rtol=1e-5, atol=1e-5)


def test_the_cap_changes_the_result():
    """The test above can fail: logits here reach well beyond the cap."""
    q, k, v = _qkv()
    capped = attend(q, k, v, None, scale=0.5, window=None, impl="xla", softcap=1.0)
    plain = attend(q, k, v, None, scale=0.5, window=None, impl="xla")
    assert float(jnp.abs(capped - plain).max()) > 0.1


def test_masked_attention_without_a_cap_is_jax_attention():
    q, k, v = _qkv(1)
    mask = causal_mask(q.shape[1], 4)
    np.testing.assert_array_equal(masked_attention(q, k, v, mask, scale=0.3),
                                  jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3))


def test_a_soft_capped_model_never_runs_cudnn():
    """cuDNN attention takes no soft-cap: with a cap, attention_impl='cudnn' runs XLA with
    explicit logits (here on CPU, where cuDNN would raise), with the same values."""
    q, k, v = _qkv(2)
    got = attend(q, k, v, None, scale=0.3, window=3, impl="cudnn", softcap=2.0)
    want = attend(q, k, v, None, scale=0.3, window=3, impl="xla", softcap=2.0)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(Exception):  # without a cap the request reaches cuDNN, absent on CPU
        jax.block_until_ready(attend(q, k, v, None, scale=0.3, window=3, impl="cudnn"))

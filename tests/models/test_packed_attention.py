"""Packed-row attention: the mask rule by hand, and the splash form equal to XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.data import packing
from kto_jax.models.packed_attention import (PackedLayout, packed_mask, splash_key_layout)


def _layout(rows, t=128, seed=0, m=8):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 50, rng.integers(1, 25)) for _ in range(m)]
    ys = [rng.integers(3, 50, rng.integers(1, 20)) for _ in range(m)]
    out = packing.pack_unpaired(prompts, ys, pack_length=t, num_rows=rows, completion_length=20,
                                pad_id=0)
    return PackedLayout(*(jnp.asarray(out[k]) for k in
                          ("packed_segment_ids", "packed_branch_ids", "packed_positions")))


def test_mask_follows_the_tree_rule_token_by_token():
    layout = _layout(rows=3)
    window = 9
    got = np.asarray(packed_mask(layout, window))[:, 0]
    seg, br, pos = (np.asarray(a) for a in layout)
    for b in range(seg.shape[0]):
        for q in range(seg.shape[1]):
            for k in range(seg.shape[1]):
                want = q == k or (seg[b, q] == seg[b, k] > 0 and k <= q
                                  and br[b, k] in (0, br[b, q]) and pos[b, q] - pos[b, k] < window)
                assert got[b, q, k] == want, (b, q, k)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 6])
def test_splash_packed_attention_equals_masked_xla_values_and_grads(window):
    """The doubled-key splash form (Pallas interpret mode), sharded over rows and heads, equals
    XLA's attention with the explicit packed mask, forward and backward."""
    from kto_jax.models.splash_attention import splash_packed_attention
    from kto_jax.sharding import make_mesh
    layout = _layout(rows=4, seed=1, m=12)
    ids = splash_key_layout(layout)
    rng = np.random.default_rng(2)
    b, t, h, kh, hd = 4, 128, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, h, hd), (b, t, kh, hd), (b, t, kh, hd)))
    scale = hd ** -0.5
    # outputs at padding (segment 0) are meaningless (the splash form lets padding see padding)
    weights = (layout.segment_ids > 0)[:, :, None, None] * jnp.cos(jnp.arange(hd))

    def ref(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=packed_mask(layout, window), scale=scale)
        return out * weights

    def splash(q, k, v):
        return splash_packed_attention(q, k, v, *ids, scale=scale, sliding_window=window) * weights

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a))

    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        np.testing.assert_allclose(jax.jit(splash)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
        got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

"""Transformer: interface, padding handling, dtypes, remat and logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.models.config import ModelConfig, qwen3_0_6b, tiny
from kto_jax.models.transformer import (LAYER_AXES, Transformer, abstract_model, apply_rope,
                                        positions_from_mask, rms_norm)


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny(), rngs=nnx.Rngs(0))


@nnx.jit
def forward(m, ids, pos, mask):
    return m(ids, pos, mask)


def _batch():
    # row 0: left-padded prompt; row 1: right padding; row 2: both sides
    ids = np.array([[0, 0, 5, 6, 7, 8, 9, 10],
                    [11, 12, 13, 14, 15, 0, 0, 0],
                    [0, 0, 16, 17, 18, 19, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    return jnp.asarray(ids), positions_from_mask(mask), jnp.asarray(mask)


def test_positions_from_mask_counts_real_tokens_only():
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2, 2], [0, 1, 1, 1, 1, 1]])


def test_interface_shapes_and_dtypes(model):
    ids, pos, mask = _batch()
    hidden = model.hidden_states(ids, pos, mask)
    w = model.lm_head_weight()
    logits = model(ids, pos, mask)
    assert hidden.shape == (3, 8, 64) and hidden.dtype == jnp.float32
    assert w.shape == (64, 256)
    assert logits.shape == (3, 8, 256) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, hidden @ w, atol=1e-5)
    assert not np.isnan(np.asarray(logits)).any()  # fully padded queries must not produce NaN


def test_padding_does_not_change_real_token_logits(model):
    """Each row's real-token logits are the same wherever its padding sits (left, right, split)."""
    ids, pos, mask = _batch()
    logits = forward(model, ids, pos, mask)
    moved_ids, moved_mask = np.zeros_like(ids), np.zeros_like(mask)
    starts = [2, 0, 1]  # row 0 -> right-padded by 2, row 1 -> left-padded by 3, row 2 -> 1 + 3
    for row, start in enumerate(starts):
        real = np.nonzero(np.asarray(mask[row]))[0]
        moved_ids[row, start:start + len(real)] = ids[row, real]
        moved_mask[row, start:start + len(real)] = 1
    moved = forward(model, jnp.asarray(moved_ids), positions_from_mask(moved_mask), jnp.asarray(moved_mask))
    for row, start in enumerate(starts):
        real = np.nonzero(np.asarray(mask[row]))[0]
        np.testing.assert_allclose(logits[row, real], moved[row, start:start + len(real)], atol=2e-5)


def test_tied_lm_head_is_embedding_transpose():
    m = Transformer(tiny(tie_word_embeddings=True), rngs=nnx.Rngs(1))
    assert not hasattr(m, "lm_head")
    np.testing.assert_array_equal(m.lm_head_weight(), m.embed_tokens[...].T)


def test_remat_keeps_values_and_gradients(model):
    ids, pos, mask = _batch()
    remat = Transformer(tiny(remat_policy="dots_no_batch"), rngs=nnx.Rngs(0))

    def loss(m):
        return jnp.sum(m(ids, pos, mask) * mask[..., None]) / 100.0

    grad = nnx.jit(nnx.grad(loss))
    for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat))):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("policy,saved", [("none", None), ("full", "policy=None"),
                                          ("dots", "only_if_no_batch_dims=False"),
                                          ("dots_no_batch", "only_if_no_batch_dims=True")])
def test_remat_policy_reaches_jax_checkpoint(policy, saved):
    ids, pos, mask = _batch()
    graphdef, state = nnx.split(abstract_model(tiny(remat_policy=policy)))
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, pos, mask))(state))
    assert ("remat" in jaxpr) == (saved is not None)
    if saved:
        assert saved in jaxpr


def test_bf16_compute_with_fp32_params(model):
    cfg = tiny(dtype="bfloat16", param_dtype="float32")
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    ids, pos, mask = _batch()
    assert m.embed_tokens[...].dtype == jnp.float32
    assert m.hidden_states(ids, pos, mask).dtype == jnp.bfloat16
    logits = forward(m, ids, pos, mask)
    assert logits.dtype == jnp.float32
    ref = forward(model, ids, pos, mask)
    np.testing.assert_allclose(logits, ref, atol=0.05)


def test_every_param_has_logical_axes_matching_its_rank():
    cfg = qwen3_0_6b()  # qk_norm and all layer params present, built abstractly
    state = nnx.state(abstract_model(cfg), nnx.Param)
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.get_value().shape), path
        assert set(axes) <= allowed, path
    layers = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg).layers, nnx.Param)))
    assert {p[0] for p in layers} == set(LAYER_AXES) - {"q_bias", "k_bias", "v_bias"}
    assert layers[("q_proj",)].get_value().shape == (28, 1024, 16, 128)


def test_rms_norm_and_rope_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w = rng.normal(size=(8,)).astype(np.float32)
    want = w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6), want, rtol=1e-5)
    # RoPE on a 2-dim head is a plain rotation by angle theta.
    v = rng.normal(size=(1, 1, 1, 2)).astype(np.float32)
    theta = 0.7
    got = apply_rope(jnp.asarray(v), jnp.full((1, 1, 1), np.cos(theta)), jnp.full((1, 1, 1), np.sin(theta)))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    np.testing.assert_allclose(got[0, 0, 0], rot @ v[0, 0, 0], rtol=1e-6)


def test_config_is_hashable_and_rejects_bad_options():
    from kto_jax.errors import UserError
    assert hash(tiny()) == hash(tiny())
    with pytest.raises(UserError, match="remat_policy"):
        ModelConfig(remat_policy="sometimes")
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        ModelConfig(architecture="GPT2LMHeadModel")

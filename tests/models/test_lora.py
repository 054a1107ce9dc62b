"""LoRA on the stacked layer weights: exact base at B = 0, merge, gradients, sharding, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny_models import base_config

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.losses import get_loss
from kto_jax.losses.registry import ValueHead
from kto_jax.models import ModelConfig, Transformer, init_model, positions_from_mask
from kto_jax.models import lora

# Qwen2 shape: q/k/v biases on, GQA; head_dim * heads != hidden to catch axis mix-ups.
CONFIG = ModelConfig(architecture="Qwen2ForCausalLM", attention_bias=True, hidden_size=48, num_heads=4,
                     num_kv_heads=2, head_dim=16, intermediate_size=96, num_layers=3, vocab_size=128)
LORA = lora.LoraConfig(rank=4, alpha=8.0, seed=3)


def _batch():
    ids = (jnp.arange(2 * 10).reshape(2, 10) * 7) % CONFIG.vocab_size
    mask = jnp.ones((2, 10), jnp.int32).at[1, :3].set(0)
    return ids, positions_from_mask(mask), mask


def _random_b(adapters, seed=5, scale=0.05):
    """Adapters with non-zero B (a trained state), so every gradient term is exercised."""
    keys = iter(jax.random.split(jax.random.key(seed), len(adapters.targets)))
    for t in adapters.targets:
        var = getattr(adapters, t + lora.B_SUFFIX)
        var.set_value(jax.device_put(scale * jax.random.normal(next(keys), var[...].shape), var[...].sharding))
    return adapters


@nnx.jit
def _logits(m, ids, pos, mask):
    return m(ids, pos, mask)


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


def test_zero_b_gives_exactly_the_base_logits(model):
    adapters = lora.LoraAdapters(CONFIG, LORA, rngs=nnx.Rngs(1))
    ids, pos, mask = _batch()
    base = _logits(model, ids, pos, mask)
    policy = lora.attach(model, adapters)
    np.testing.assert_array_equal(np.asarray(_logits(policy, ids, pos, mask)), np.asarray(base))
    assert getattr(model, "lora", None) is None  # the reference keeps no adapters
    assert np.abs(np.asarray(adapters.factors("q_proj")[0])).max() > 0  # A is random, B alone is zero


def test_attached_adapters_equal_the_merged_weights(model):
    adapters = _random_b(lora.LoraAdapters(CONFIG, LORA, rngs=nnx.Rngs(1)))
    ids, pos, mask = _batch()
    got = _logits(lora.attach(model, adapters), ids, pos, mask)
    # Hand merge: W + (alpha / r) A B per layer, in HF-free numpy.
    merged = nnx.merge(*nnx.split(model), copy=True)
    for t in adapters.targets:
        a, b = (np.asarray(x, np.float64) for x in adapters.factors(t))
        w = getattr(merged.layers, t)
        delta = np.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, 4), b.reshape(b.shape[0], 4, -1))
        w.set_value(jnp.asarray(np.asarray(w[...], np.float64) + 2.0 * delta.reshape(w[...].shape), jnp.float32))
    want = _logits(merged, ids, pos, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(_logits(lora.merge(model, adapters), ids, pos, mask)), np.asarray(want),
                               atol=2e-5, rtol=0)
    assert np.abs(np.asarray(got - _logits(model, ids, pos, mask))).max() > 1e-2  # the adapters do change the logits


@pytest.mark.slow
@pytest.mark.parametrize("zero_b", [True, False])
def test_lora_gradient_is_the_projection_of_the_full_gradient(model, zero_b):
    """W_eff = W + s A B (A, B flattened to [in, r], [r, out]); with G = df/dW_eff,
    df/dA = s G B^T and df/dB = s A^T G (chain rule). G comes from the full-parameter
    gradient of the merged model, at the same W_eff."""
    adapters = lora.LoraAdapters(CONFIG, LORA, rngs=nnx.Rngs(1))
    if not zero_b:
        _random_b(adapters)
    ids, pos, mask = _batch()
    probe = jax.random.normal(jax.random.key(9), (2, 10, CONFIG.vocab_size))

    def f(logits):  # a scalar function of the logits, real tokens only
        return jnp.sum(jnp.tanh(logits) * probe * mask[..., None])

    graphdef, state = nnx.split(adapters)
    lora_grads = jax.jit(jax.grad(lambda s: f(lora.attach(model, nnx.merge(graphdef, s))(ids, pos, mask))))(state)
    merged = lora.merge(model, adapters)
    mg, mstate = nnx.split(merged)
    full = jax.jit(jax.grad(lambda s: f(nnx.merge(mg, s)(ids, pos, mask))))(mstate)
    s_ = LORA.scale
    for t in adapters.targets:
        a, b = (np.asarray(x, np.float64) for x in adapters.factors(t))
        n, r = a.shape[0], a.shape[-1]
        a2, b2 = a.reshape(n, -1, r), b.reshape(n, r, -1)
        g = np.asarray(full["layers"][t][...], np.float64).reshape(n, a2.shape[1], -1)
        want_a = s_ * np.einsum("lio,lro->lir", g, b2)
        want_b = s_ * np.einsum("lir,lio->lro", a2, g)
        got_a = np.asarray(lora_grads[t + lora.A_SUFFIX][...]).reshape(want_a.shape)
        got_b = np.asarray(lora_grads[t + lora.B_SUFFIX][...]).reshape(want_b.shape)
        np.testing.assert_allclose(got_a, want_a, atol=1e-5 * max(1, np.abs(want_a).max()), rtol=0)
        np.testing.assert_allclose(got_b, want_b, atol=1e-5 * np.abs(want_b).max(), rtol=0)
        assert np.abs(want_b).max() > 0
        if zero_b:
            np.testing.assert_array_equal(got_a, 0.0)  # dL/dA = s G B^T = 0 while B = 0


@pytest.mark.slow
def test_adapters_shard_like_their_matrix_and_mesh_logits_match_one_device():
    rules = base_config().mesh.rules
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = nnx.state(lora.abstract_adapters(CONFIG, LORA))
    specs = shd.partition_specs(abstract, rules, mesh)
    P = jax.sharding.PartitionSpec
    assert specs["q_proj_lora_a"].get_value() == P(None, "fsdp", None)            # A: W's input axis 'embed'
    assert specs["q_proj_lora_b"].get_value() == P(None, None, "tensor", None)    # B: W's output axes 'heads', 'head_dim'
    assert specs["o_proj_lora_a"].get_value() == P(None, "tensor", None, None)    # A: 'heads', 'head_dim'
    assert specs["down_proj_lora_b"].get_value() == P(None, None, "fsdp")         # B: 'embed'
    ids, pos, mask = _batch()
    one = lora.attach(init_model(CONFIG, seed=0), _random_b(lora.init_adapters(CONFIG, LORA)))
    want = np.asarray(_logits(one, ids, pos, mask))
    base = init_model(CONFIG, mesh=mesh, rules=rules, seed=0)
    adapters = _random_b(lora.init_adapters(CONFIG, LORA, mesh=mesh, rules=rules))
    assert adapters.gate_proj_lora_b[...].sharding.spec == P(None, None, "tensor")
    graphdef, state = nnx.split(base)
    agraph, astate = nnx.split(adapters)
    fn = shd.activation_sharding(lambda s, a: lora.attach(nnx.merge(graphdef, s), nnx.merge(agraph, a))(
        ids, pos, mask), mesh, rules)
    got = np.asarray(jax.jit(fn)(state, astate))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_dropout_applies_only_with_a_key_and_is_inverted_scaled(model):
    cfg = dataclasses.replace(LORA, dropout=0.5)
    adapters = _random_b(lora.LoraAdapters(CONFIG, cfg, rngs=nnx.Rngs(1)))
    ids, pos, mask = _batch()
    plain = _logits(lora.attach(model, adapters), ids, pos, mask)
    dropped = [_logits(lora.attach(model, adapters, dropout_key=jax.random.key(k)), ids, pos, mask)
               for k in range(2)]
    base = _logits(model, ids, pos, mask)
    assert np.abs(np.asarray(dropped[0] - dropped[1])).max() > 1e-3   # a fresh mask per key
    assert np.abs(np.asarray(dropped[0] - plain)).max() > 1e-3
    # Dropout is on the adapter input only: with B = 0 every key gives the base exactly.
    zero = lora.LoraAdapters(CONFIG, cfg, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(_logits(lora.attach(model, zero, dropout_key=jax.random.key(0)),
                                                  ids, pos, mask)), np.asarray(base))


def test_dense_dropout_matches_a_hand_computation():
    from kto_jax.models.transformer import dense
    x = jax.random.normal(jax.random.key(0), (1, 3, 6))
    w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in ((1, (6, 5)), (2, (6, 2)), (3, (2, 5))))
    p = {"up_proj": w, "up_proj_lora_a": a, "up_proj_lora_b": b, "lora_dropout_key": jax.random.key(7),
         "lora_dropout_rate": jnp.float32(0.25)}
    key = jax.random.fold_in(jax.random.key(7), sum(map(ord, "up_proj")))
    keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
    xd = np.where(keep, np.asarray(x) / 0.75, 0)
    want = np.asarray(x) @ np.asarray(w) + xd @ np.asarray(a) @ np.asarray(b)
    np.testing.assert_allclose(np.asarray(dense("btd,df->btf", x, p, "up_proj")), want, atol=1e-5)


def test_config_lora_is_off_by_default_and_read_from_the_config():
    c = base_config()
    assert not lora.LoraConfig.from_config(c.lora).enabled
    c.lora.rank, c.lora.alpha = 16, 32.0
    got = lora.LoraConfig.from_config(c.lora)
    assert got.enabled and got.scale == 2.0 and got.target_modules == lora.TARGET_MODULES
    assert lora.LoraConfig.from_config({"rank": 2, "target_modules": "q_proj, v_proj"}).target_modules == (
        "q_proj", "v_proj")
    # the command line's --config.lora.target_modules=a,b overrides the tuple with ('a,b',)
    assert lora.LoraConfig.from_config({"rank": 2, "target_modules": ("q_proj,expert_down_proj",)}
                                       ).target_modules == ("q_proj", "expert_down_proj")
    for name in ("kto", "dpo", "sft", "ppo_offline"):  # every registry loss trains with LoRA
        lora.validate(got, CONFIG, get_loss(name))


@pytest.mark.parametrize("changes, needle", [
    (dict(rank=-2), "config.lora.rank=-2"),
    (dict(alpha=0.0), "config.lora.alpha=0.0"),
    (dict(dropout=1.0), "config.lora.dropout=1.0"),
    (dict(target_modules=("q_proj", "qkv_proj")), "unknown module(s) qkv_proj"),
    (dict(target_modules=()), "config.lora.target_modules is empty"),
])
def test_bad_lora_settings_are_named(changes, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        lora.validate(dataclasses.replace(LORA, **changes), CONFIG)


def test_a_loss_head_that_cannot_be_adapted_is_named():
    head = ValueHead(init=lambda key, hidden: {}, apply=lambda params, hidden: hidden[..., 0],
                     name="uses_reward_head", beside_lora=False)
    loss = dataclasses.replace(get_loss("kto"), value_head=head)
    with pytest.raises(UserError, match="config.loss.name='kto'.*uses_reward_head"):
        lora.validate(LORA, CONFIG, loss)


def test_trainable_count_and_shapes():
    adapters = lora.abstract_adapters(CONFIG, LORA)
    d, f, hd, r, n = 48, 96, 16, 4, 3
    per_layer = (d * r + r * 4 * hd) + 2 * (d * r + r * 2 * hd) + (4 * hd * r + r * d) + 2 * (d * r + r * f) + (
        f * r + r * d)
    assert lora.trainable_count(adapters) == n * per_layer
    assert adapters.o_proj_lora_a.shape == (n, 4, hd, r) and adapters.k_proj_lora_b.shape == (n, r, 2, hd)
